"""Distillation objectives, one per file; importing this package registers them all."""

from fdistill.objectives import dmd, f_distill  # noqa: F401  (registration)
from fdistill.objectives import diff_instruct, sid, sim, uni_instruct  # noqa: F401  (registration)
from fdistill.objectives import rcm, scm  # noqa: F401  (registration)
from fdistill.objectives.base import OBJECTIVES, Batch, Networks, Objective, build_objective

__all__ = ["OBJECTIVES", "Batch", "Networks", "Objective", "build_objective"]
