"""fdistill: distil diffusion teachers into one-step and few-step students.

``import fdistill`` stays cheap: the names below are imported on first use. They let diffusers load an exported
student (``fdistill.pipelines``): its ``model_index.json`` names the scheduler ``["fdistill", "FDistillScheduler"]``,
and diffusers looks up that class and the loadable base class it derives from (``SchedulerMixin``, which says
how to load it) as attributes of the ``fdistill`` module.
"""

_LAZY = {"FDistillScheduler": "fdistill.pipelines", "SchedulerMixin": "diffusers"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fdistill' has no attribute {name!r}")
