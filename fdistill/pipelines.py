"""Export a trained student as a diffusers pipeline that samples exactly like :meth:`Generator.sample`.

The exported directory is a stock ``ConsistencyModelPipeline`` (the student's ``UNet2DModel`` and an
:class:`FDistillScheduler`) written by ``save_pretrained``, plus ``fdistill.json`` describing how it was made.
``model_index.json`` names the scheduler's library as ``fdistill``; diffusers resolves that from the imported
``fdistill`` package (whose lazy ``__getattr__`` provides :class:`FDistillScheduler`), so no
``trust_remote_code`` and no code in the directory::

    import fdistill  # recent diffusers only load components of libraries the caller has imported
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("runs/x/pipeline")
    images = pipe(batch_size=8, class_labels=[0, 1, 2, 3, 4, 5, 6, 7], num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0)).images

Pass ``class_labels`` to a class-conditional student: without them ``ConsistencyModelPipeline`` draws labels
uniformly from every class embedding, the null (unconditional) class included.

With the same seed, ``pipe(..., output_type="pt")`` equals ``(student.sample(z, cond, K, renoise, g) / 2 + 0.5)
.clamp(0, 1)`` bit for bit, ``z = student.noise(n, generator=g)``: the pipeline draws its latents with the same
generator, the scheduler's ``init_noise_sigma`` and re-noising are the functions ``Generator.sample`` calls
(:func:`~fdistill.generator.input_scale`, :func:`~fdistill.generator.renoise`), its x0 read-out is
``UNetDenoiser``'s (float64 ``to_x0`` with the schedule's coefficients), and the UNet receives the same float32
timesteps.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ConfigMixin, ConsistencyModelPipeline, SchedulerMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from fdistill.config import ConfigError
from fdistill.denoisers import DIFFUSERS_PREDICTION, UNetDenoiser, x0_from_unet_output
from fdistill.generator import RENOISE_MODES, Generator, input_scale, renoise
from fdistill.schedules import DiscreteVPSchedule

METADATA_FILE = "fdistill.json"
LOAD_HINT = ("import fdistill; from diffusers import DiffusionPipeline; pipe = DiffusionPipeline.from_pretrained(DIR); "
             "pipe(batch_size=N, class_labels=[...], num_inference_steps=K, generator=torch.Generator()"
             ".manual_seed(SEED)). Pass class_labels: without them the pipeline draws random labels, the null "
             "class included.")


@dataclass
class FDistillSchedulerOutput(BaseOutput):
    """``prev_sample``: the next UNet input (after the last step, the sample); ``pred_original_sample``: x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class FDistillScheduler(SchedulerMixin, ConfigMixin):
    """The few-step sampler of an fdistill student, in the form ``ConsistencyModelPipeline`` drives.

    ``alphas_cumprod`` is the teacher's discrete VP table (any beta schedule), ``prediction_type`` how the UNet's
    output reads as x0, ``timesteps`` the student's sampling times ``t_0 > t_1 > ...`` (teacher time units,
    possibly fractional) and ``renoise`` how the input of the next step is made ("sde": fresh noise from the
    pipeline's generator; "ode": the noise implied by the current step). ``num_inference_steps=K`` samples with
    the first ``K`` times, as ``Generator.sample(steps=K)`` does.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, alphas_cumprod: list[float], prediction_type: str = "epsilon",
                 timesteps: list[float] | None = None, renoise: str = "sde"):
        if prediction_type not in DIFFUSERS_PREDICTION:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; "
                             f"use one of {sorted(DIFFUSERS_PREDICTION)}")
        if renoise not in RENOISE_MODES:
            raise ValueError(f"unknown renoise mode {renoise!r}; use one of {RENOISE_MODES}")
        times = [float(t) for t in timesteps or []]
        if not times or any(a <= b for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"timesteps must be a non-empty, strictly decreasing list of student times, got {times}")
        self.schedule = DiscreteVPSchedule(alphas_cumprod)
        self.student_times = times
        self.set_timesteps(len(times))

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the pipeline's unit-noise latents: ``sigma(t_0)``, as ``Generator`` scales ``z``."""
        return input_scale(self.schedule, self.student_times[0])

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Sample with the first ``num_inference_steps`` student times, or with explicit ``timesteps``.

        Explicit ``timesteps`` must be student times in decreasing order starting at ``t_0`` (the latents are
        scaled for ``t_0`` before the pipeline calls this). The UNet receives them as float32, the dtype
        ``UNetDenoiser`` gives a float32 UNet; the float64 times stay here for the arithmetic.
        """
        trained = self.student_times
        if timesteps is not None:
            chosen = [float(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
            ordered = all(a > b for a, b in zip(chosen, chosen[1:], strict=False))
            if not chosen or chosen[0] != trained[0] or not ordered or not set(chosen) <= set(trained):
                raise ValueError(f"timesteps must be student times {trained} in decreasing order starting at "
                                 f"{trained[0]}, got {chosen}")
        else:
            if num_inference_steps is None or not 1 <= num_inference_steps <= len(trained):
                raise ValueError(f"this student was trained to sample with 1..{len(trained)} steps "
                                 f"(times {trained}); num_inference_steps={num_inference_steps} is not available")
            chosen = trained[:num_inference_steps]
        self.sampling_times = chosen
        self.num_inference_steps = len(chosen)
        self.timesteps = torch.tensor(chosen, dtype=torch.float32, device=device)
        self._step_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The student's UNet takes ``x_t`` itself (no input scaling)."""
        return sample

    def x0_from_output(self, model_output: torch.Tensor, sample: torch.Tensor, t: float) -> torch.Tensor:
        """The x0-prediction of a UNet output at student time ``t``, read as ``UNetDenoiser`` reads it."""
        t_batch = torch.full((sample.shape[0],), t, dtype=torch.float64, device=sample.device)
        return x0_from_unet_output(model_output, self.config.prediction_type, sample, self.schedule, t_batch)

    def _index_of(self, timestep) -> int:
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of this sampler's {self.sampling_times}")
        return int(matches[0, 0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """x0 from the UNet output; then the next input, re-noised to the next time (after the last: x0)."""
        if isinstance(generator, list):
            raise ValueError("the fdistill sampler takes one torch.Generator for the whole batch, not a list")
        index = self._index_of(timestep) if self._step_index is None else self._step_index
        t = self.sampling_times[index]
        x0 = self.x0_from_output(model_output, sample, t)
        if index + 1 < len(self.sampling_times):
            t_next = self.sampling_times[index + 1]
            prev = renoise(self.schedule, sample, x0, t, t_next, self.config.renoise, generator)
        else:
            prev = x0
        self._step_index = index + 1
        if not return_dict:
            return prev, x0
        return FDistillSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ``model_index.json`` records a component's library from its class's module; ``fdistill`` re-exports this class
# lazily, so the record is the package, which is all a caller has to import.
FDistillScheduler.__module__ = "fdistill"


def exact_alphas_cumprod(schedule: DiscreteVPSchedule) -> list[float]:
    """``alpha_bar`` values whose logarithms are the schedule's table exactly (it keeps only the logarithms).

    diffusers tables are float32, so rounding ``exp(log alpha_bar)`` to float32 recovers them; a float64 table
    usually survives the round trip as it is. Either is checked, so the exported scheduler rebuilds the very
    same schedule.
    """
    target = schedule.log_alpha_bar
    guess = torch.exp(target)
    for candidate in (guess.float().double(), guess):
        if torch.equal(DiscreteVPSchedule(candidate).log_alpha_bar, target):
            return candidate.tolist()
    raise ValueError("the student's alpha_bar table cannot be written out exactly; export needs a schedule built "
                     "from a diffusers scheduler")


def _fdistill_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fdistill")
    except PackageNotFoundError:
        return "unknown"


def _exportable_unet(student: Generator) -> UNetDenoiser:
    """The student's ``UNetDenoiser``, or an error saying why this student cannot be exported."""
    net = student.net
    if not isinstance(net, UNetDenoiser):
        hint = (" (sCM/rCM students sample in TrigFlow time, which the exported scheduler does not implement yet)"
                if hasattr(net, "velocity") else "")
        raise ValueError(f"export needs a diffusers UNet student; this student is a {type(net).__name__}{hint}")
    if net.text_conditioned:
        raise NotImplementedError("export of text-conditioned (UNet2DConditionModel) students is not supported yet")
    if not isinstance(net.unet, UNet2DModel):
        raise ValueError(f"export needs a diffusers UNet2DModel student, not a {type(net.unet).__name__}")
    if not isinstance(net.schedule, DiscreteVPSchedule):
        raise ValueError(f"export needs a discrete VP (diffusers) schedule, not {type(net.schedule).__name__}")
    return net


def export_pipeline(student: Generator, out_dir: str | Path, metadata: dict | None = None,
                    renoise: str = "sde") -> Path:
    """Write ``student`` as a diffusers ``ConsistencyModelPipeline`` directory and return its path.

    ``metadata`` (objective, training steps, teacher, ...) goes into ``fdistill.json`` next to what the export
    knows itself (times, renoise mode, prediction type, classes, fdistill version, how to load); its keys win, e.g.
    ``num_classes`` for a UNet whose last class embedding is a real class rather than the null one. The directory
    is written beside ``out_dir`` and renamed into place, so ``out_dir`` never holds a partial export; an
    existing ``out_dir`` is replaced only if it is an earlier export (or empty).
    """
    net = _exportable_unet(student)
    if renoise not in RENOISE_MODES:
        raise ValueError(f"unknown renoise mode {renoise!r}; use one of {RENOISE_MODES}")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and ((out / METADATA_FILE).is_file() or not any(out.iterdir()))):
        raise ConfigError(f"{out} exists and is not an exported pipeline; choose another output directory")
    scheduler = FDistillScheduler(alphas_cumprod=exact_alphas_cumprod(net.schedule),
                                  prediction_type=net.prediction_type, timesteps=student.times, renoise=renoise)
    class_embeds = net.unet.config.num_class_embeds
    info = {
        "format": "fdistill student pipeline (diffusers ConsistencyModelPipeline + fdistill.FDistillScheduler)",
        "fdistill_version": _fdistill_version(),
        "student_times": list(student.times),
        "max_steps": student.max_steps,
        "renoise": renoise,
        "prediction_type": net.prediction_type,
        "sample_shape": list(net.sample_shape),
        # fdistill's convention (UNetDenoiser.null_condition): the last class embedding is the null class.
        "num_class_embeds": class_embeds,
        "num_classes": class_embeds - 1 if class_embeds else None,
        "null_class": class_embeds - 1 if class_embeds else None,
        "load": LOAD_HINT,
        **(metadata or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ConsistencyModelPipeline(unet=net.unet, scheduler=scheduler).save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an old ``out`` is moved aside first and deleted only afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".old-{out.name}-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)
