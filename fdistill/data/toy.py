"""Exact samples of an analytic teacher, served as training batches."""

from __future__ import annotations

from fdistill.containers import Batch


class TeacherSamples:
    """An endless stream of batches carrying exact mixture samples (the "real data" of toy runs) of ``teacher``, an
    analytic mixture denoiser (anything whose ``sample(n)`` returns ``(samples, components)``).

    It draws from torch's global RNG, which the trainer seeds from ``(run.seed, step)`` before every batch:
    the stream's position is the step counter, so a resumed run sees the same data without saving any.
    """

    def __init__(self, teacher, batch_size: int, with_real: bool = True):
        self.teacher, self.batch_size, self.with_real = teacher, batch_size, with_real

    def __iter__(self):
        while True:
            real = self.teacher.sample(self.batch_size)[0] if self.with_real else None
            yield Batch(size=self.batch_size, real=real)
