"""Measure a shipped text-to-image teacher and record the numbers in its provenance.json.

    python scripts/evaluate_shapes_t2i_teacher.py [--teacher unet|flow]

``unet`` is fdistill/assets/shapes_t2i_teacher (its quickstart: configs/quickstart_t2i.yaml), ``flow`` the
flow-matching fdistill/assets/shapes_flow_teacher (configs/quickstart_t2i_flow.yaml).

The protocol is the text-to-image task's evaluation (fdistill/tasks/text_to_image.py) of the teacher alone:
``PROTOCOL`` below, on the 40 training and the 8 held-out prompts, with the shipped shapes CLIP, attribute
classifier and ``fdistill-shapes`` FD. tests/test_shapes_assets.py recomputes it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fdistill.recipes import load_config
from fdistill.run import build_experiment

ROOT = Path(__file__).resolve().parent.parent
TEACHERS = {"unet": ("fdistill/assets/shapes_t2i_teacher", "configs/quickstart_t2i.yaml"),
            "flow": ("fdistill/assets/shapes_flow_teacher", "configs/quickstart_t2i_flow.yaml")}
PROTOCOL = {"eval.num_samples": 240, "eval.teacher_steps": 25, "eval.teacher_sampler": "euler",
            "teacher.guidance_scale": 2.0, "eval.seed": 1234}
METRICS = ("clip_score", "fd", "compositional_accuracy", "colour_accuracy", "shape_accuracy", "position_accuracy")


def teacher_metrics(protocol: dict, config: str) -> dict[str, dict[str, float]]:
    """``{prompt set: {metric: value}}`` of the teacher's sampler of ``config`` under ``protocol``."""
    overrides = [f"{k}={v}" for k, v in protocol.items()] + ["eval.student_steps=[]", "eval.save_samples=false"]
    cfg, options = load_config(ROOT / config, overrides)
    nets, _, task = build_experiment(cfg, options)
    with tempfile.TemporaryDirectory() as run_dir:
        results = task.evaluate(nets, Path(run_dir))
    return {r["prompts"]: {k: r[k] for k in METRICS} for r in results if r["model"] == "teacher"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="unet")
    teacher_dir, config = TEACHERS[parser.parse_args().teacher]
    metrics = teacher_metrics(PROTOCOL, config)
    provenance_file = ROOT / teacher_dir / "provenance.json"
    provenance = json.loads(provenance_file.read_text())
    provenance["evaluation"] = {"script": "scripts/evaluate_shapes_t2i_teacher.py", "protocol": PROTOCOL,
                                "metrics": metrics}
    provenance_file.write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
