"""Distillation objectives, one per file; importing this package registers them all."""

from fdistill.objectives import diff_instruct, dmd, f_distill, rcm, scm, sid, sim, uni_instruct  # noqa: F401  (registration)
from fdistill.objectives.base import OBJECTIVES, Objective, build_objective

__all__ = ["OBJECTIVES", "Objective", "build_objective"]
