"""fdistill: distil diffusion teachers into one-step and few-step students.

``import fdistill`` is cheap; the package's modules are imported where they are used. Exported students are
stock diffusers pipelines and need no fdistill to load (``fdistill.pipelines.export``).
"""
