"""End-of-run evaluation: one sampler loop (:func:`~fdistill.evaluation.loop.evaluate_samplers`) and a judge per
task that turns samples into numbers (see ``README.md`` beside this file).

The names below are the ones code outside the evaluation reads: the fixed-seed samplers (``sample.py``, the
benchmarks, training-time metrics), PNG folders and the class statistics.
"""

from fdistill.evaluation.images import class_statistics
from fdistill.evaluation.loop import evaluate_samplers, write_png_folder
from fdistill.evaluation.sampling import student_samples, teacher_samples

__all__ = ["class_statistics", "evaluate_samplers", "student_samples", "teacher_samples", "write_png_folder"]
