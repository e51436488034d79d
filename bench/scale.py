"""Memory at real size: the pre-flight's estimate for published architectures with random weights, and measured
peaks where this machine can run them.

    python bench/scale.py                                  # estimates: every architecture, lever set, objective
    python bench/random_sd15.py /tmp/sd15 && python bench/scale.py --measure-cpu /tmp/sd15   # and the CPU rows

Nothing is downloaded. Each denoiser is built from its published config (``bench/architectures.py``) on the meta
device and read by fdistill's own adapter at the listed resolution and batch; the estimate is the run's own
pre-flight (:func:`fdistill.preflight.estimate_memory`): frozen weights, text encoders and VAE, trained weights,
gradients, AdamW states, one EMA, activations measured on meta tensors, for the objective's kept passes. The text
encoders and VAE enter with their published parameter counts (``TEXT_ENCODERS``, ``VAES``); they are on the GPU
only between steps, so its peak holds the larger of them and the activations. The process's own memory is left out
(a CUDA context adds about 0.5 GiB). Wan2.1 has no fdistill adapter yet: its transformer is called directly on
81-frame latents of a 480x832 video with a flow-matching schedule, as its pipeline does.

Lever sets: ``full/full fp32`` (a float32 teacher and two float32 copies, no checkpointing), ``full/LoRA bf16 ckpt``
(a full student and a rank-32 LoRA fake score on the teacher's bfloat16 base, gradient checkpointing), ``LoRA/LoRA
bf16 ckpt`` (both rank-32 LoRA networks on one bfloat16 base, gradient checkpointing). Objectives: DMD2 (DMD with
its GAN term), f-distill and rCM, under ``train.mixed_precision=bf16`` as on a GPU. Every row but the measured ones
is an estimate and says so. Results: ``bench/results/scale.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from architectures import ARCHITECTURES, build_on_meta  # noqa: E402

from fdistill.networks.denoisers import DiffusersDenoiser  # noqa: E402
from fdistill.pipelines.specs import SPECS  # noqa: E402
from fdistill.pipelines.transformers import pack_text_condition  # noqa: E402
from fdistill.preflight import GIB, MetaPipeline, estimate_memory  # noqa: E402
from fdistill.recipes import load_config  # noqa: E402
from fdistill.schedules import FlowMatchSchedule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "scale.json"

# Published parameter counts of each pipeline's text encoders, and of its VAE (their model cards and configs).
TEXT_ENCODERS = {
    "sd15": 123_060_480,  # CLIP ViT-L/14 text model
    "sdxl": 123_060_480 + 694_659_840,  # CLIP ViT-L, OpenCLIP ViT-bigG text model
    "sd35_medium": 123_650_304 + 694_659_840 + 4_762_310_656,  # CLIP-L, CLIP-G, T5-XXL encoder
    "flux_dev": 123_060_480 + 4_762_310_656,  # CLIP-L, T5-XXL encoder
    "sana_1600m": 2_614_341_888,  # Gemma-2-2B
    "pixart_sigma": 4_762_310_656,  # T5-XXL encoder
    "wan21_t2v_1_3b": 5_680_910_336,  # UMT5-XXL encoder
}
VAES = {"sd15": 83_653_863, "sdxl": 83_653_863, "sd35_medium": 83_819_683, "flux_dev": 83_819_683,
        "sana_1600m": 312_250_275, "pixart_sigma": 83_653_863, "wan21_t2v_1_3b": 126_892_531}


@dataclass(frozen=True)
class Setting:
    """How an architecture is distilled here: its pipeline class, scheduler, text condition, resolution, batch."""

    pipeline: str | None  # the spec's pipeline class (None: no fdistill adapter yet)
    scheduler: dict
    text: tuple[int, int]  # prompt tokens, width
    row: int | None  # the width of the pooled embedding or the mask packed as one more row (None: none)
    resolution: int
    batch: int


VP = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
      "beta_schedule": "scaled_linear"}
SETTINGS = {
    "sd15": Setting("StableDiffusionPipeline", {**VP, "prediction_type": "epsilon"}, (77, 768), None, 512, 2),
    "sdxl": Setting("StableDiffusionXLPipeline", {**VP, "prediction_type": "epsilon"}, (77, 2048), 1280, 1024, 2),
    "sd35_medium": Setting("StableDiffusion3Pipeline", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                        "shift": 3.0}, (333, 4096), 2048, 1024, 1),
    "flux_dev": Setting("FluxPipeline", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                         "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                                         "base_image_seq_len": 256, "max_image_seq_len": 4096},
                        (512, 4096), 768, 1024, 1),
    "sana_1600m": Setting("SanaPipeline", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
                          (300, 2304), 300, 1024, 1),
    "pixart_sigma": Setting("PixArtSigmaPipeline", {**VP, "beta_start": 0.0001, "beta_end": 0.02,
                                                    "beta_schedule": "linear", "prediction_type": "epsilon"},
                            (300, 4096), 300, 1024, 1),
    "wan21_t2v_1_3b": Setting(None, {"shift": 3.0}, (512, 4096), None, 480, 1),
}
WAN_FRAMES, WAN_WIDTH = 81, 832

LEVERS = {
    "full/full fp32": ["teacher.dtype=fp32"],
    "full/LoRA bf16 ckpt": ["fake_score.lora={rank: 32}", "teacher.dtype=bf16", "train.gradient_checkpointing=true"],
    "LoRA/LoRA bf16 ckpt": ["student.lora={rank: 32}", "fake_score.lora={rank: 32}", "teacher.dtype=bf16",
                            "train.gradient_checkpointing=true"],
}
OBJECTIVES = {"DMD2": ["objective.name=dmd", "objective.gan_weight=0.1"], "f-distill": ["objective.name=f_distill"],
              "rCM": ["objective.name=rcm", "generator.times=[1.5]"]}


class WanDenoiser(DiffusersDenoiser):
    """Wan2.1's transformer on video latents ``[B, 16, frames, H, W]``, called as its pipeline calls it."""

    def __init__(self, transformer: nn.Module, sample_shape: tuple[int, ...]):
        super().__init__()
        self.transformer, self.sample_shape = transformer, sample_shape
        self.schedule, self.prediction_type = FlowMatchSchedule(1000, 3.0), "flow_prediction"
        self.conditional = self.text_conditioned = True
        self.feature_blocks = []

    @property
    def network(self) -> nn.Module:
        return self.transformer

    def network_output(self, x_t, t, cond=None):
        return self.transformer(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]


class Parameters(nn.Module):
    """``count`` parameters on the meta device: a text encoder or VAE of that size, for the estimate."""

    def __init__(self, count: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(count, device="meta"), requires_grad=False)


def meta_pipeline(name: str) -> MetaPipeline:
    arch, setting = ARCHITECTURES[name], SETTINGS[name]
    model = build_on_meta(name)
    scale = arch.vae_scale_factor
    if setting.pipeline is None:
        frames = (WAN_FRAMES - 1) // arch.temporal_compression + 1
        shape = (arch.latent_channels, frames, setting.resolution // scale, WAN_WIDTH // scale)
        teacher = WanDenoiser(model, shape)
    else:
        spec = SPECS[setting.pipeline]
        resolution = None if spec.adapter.__name__ == "UNetDenoiser" else setting.resolution
        if resolution is None:
            model.register_to_config(sample_size=setting.resolution // scale)
        teacher = spec.adapter.from_pipeline(model, setting.scheduler, scale, None, resolution, None)
    tokens, width = setting.text
    hidden = torch.zeros(1, tokens, width, device="meta")
    condition = hidden if setting.row is None else pack_text_condition(hidden, torch.zeros(1, setting.row,
                                                                                           device="meta"))
    return MetaPipeline(teacher, [Parameters(TEXT_ENCODERS[name])], Parameters(VAES[name]), condition)


def estimate_rows(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        for levers, lever_overrides in LEVERS.items():
            for objective, objective_overrides in OBJECTIVES.items():
                cfg, options = load_config(None, ["data.kind=captioned_shapes", "train.mixed_precision=bf16",
                                                  f"train.batch_size={SETTINGS[name].batch}", "ema.averages=[]",
                                                  *lever_overrides, *objective_overrides])
                estimate = estimate_memory(cfg, options, process_memory=0, pipeline=meta_pipeline(name),
                                           device="cuda")
                rows.append({"architecture": name, "parameters": sum(p.numel() for p in build_on_meta(name)
                                                                     .parameters()),
                             "resolution": SETTINGS[name].resolution, "batch": SETTINGS[name].batch,
                             "levers": levers, "objective": objective, "estimated_peak_gib": estimate.total / GIB,
                             "components_gib": {k: v / GIB for k, (v, _) in estimate.rows.items()},
                             "measured_peak_gib": None, "kind": "estimate"})
    return rows


# The CPU rows: an SD 1.5-architecture pipeline with random weights (bench/random_sd15.py) at 256 px, distilled as a
# user's own pipeline with the text-to-image DMD2 recipe (its GAN term off: no real images), batch 1, 5 steps (the
# recipe's 4 critic steps and one generator step).
CPU_RUN = ["--config", "configs/quickstart_t2i.yaml", "--overwrite", "--no-progress", "teacher.kind=pretrained",
           "train.batch_size=1", "train.steps=5", "objective.gan_weight=0", "eval.num_samples=65",
           "log.tensorboard=false"]
CPU_ROWS = {
    "LoRA/LoRA bf16 ckpt": ["student.lora={rank: 32}", "fake_score.lora={rank: 32}", "teacher.dtype=bf16",
                            "train.gradient_checkpointing=true"],
    "full/LoRA bf16 ckpt": ["fake_score.lora={rank: 32}", "teacher.dtype=bf16", "train.gradient_checkpointing=true"],
    "full/full fp32": ["teacher.dtype=fp32"],
}
PEAK_LINE = re.compile(r"training peak memory ([\d.]+) GiB per process \(pre-flight estimate ([\d.]+) GiB\)")


def measure_cpu(pipeline: Path, work: Path) -> list[dict]:
    """Train each CPU row until the run prints its training peak beside its estimate (the evaluation that follows
    is not part of the measurement), or until the pre-flight refuses it."""
    import subprocess
    import time

    rows = []
    for levers, overrides in CPU_ROWS.items():
        command = [sys.executable, "train.py", *CPU_RUN, f"teacher.pretrained={pipeline}",
                   f"run.dir={work / levers.replace('/', '_').replace(' ', '_')}", *overrides]
        start = time.time()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        row = {"levers": levers, "command": "python train.py " + " ".join(command[2:]), "kind": "measured",
               "device": "cpu", "resolution": 256, "batch": 1}
        for line in process.stdout:
            if (found := PEAK_LINE.search(line)) or line.startswith("error:"):
                break
        process.kill()
        process.wait()
        if found:
            measured, estimated = float(found.group(1)), float(found.group(2))
            row |= {"measured_peak_gib": measured, "estimated_peak_gib": estimated,
                    "estimate_over_measured": estimated / measured, "seconds_to_train": time.time() - start}
        else:
            row |= {"refused": line.strip()}
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="*", default=list(SETTINGS))
    parser.add_argument("--measure-cpu", type=Path, metavar="PIPELINE",
                        help="also measure the CPU rows on this SD 1.5-architecture pipeline (bench/random_sd15.py); "
                             "without it, the rows measured before are kept")
    parser.add_argument("--work", type=Path, default=Path("runs/scale"), help="run directories of --measure-cpu")
    args = parser.parse_args(argv)
    rows = estimate_rows(args.architectures)
    if args.measure_cpu:
        measured = measure_cpu(args.measure_cpu, args.work)
    else:  # keep the rows measured before
        measured = json.loads(RESULTS.read_text())["measured"] if RESULTS.is_file() else []
    print(f"{'architecture':<16} {'params':>7} {'px':>5} {'batch':>5}  {'levers':<20} {'objective':<10} "
          f"{'peak GiB (estimate)':>20}")
    for r in rows:
        print(f"{r['architecture']:<16} {r['parameters'] / 1e9:6.2f}B {r['resolution']:>5} {r['batch']:>5}  "
              f"{r['levers']:<20} {r['objective']:<10} {r['estimated_peak_gib']:>20.1f}")
    for r in measured:
        outcome = r.get("refused") or (f"peak {r['measured_peak_gib']:.2f} GiB, estimate {r['estimated_peak_gib']:.2f}"
                                       f" GiB ({r['estimate_over_measured']:.3f}x)")
        print(f"measured sd15 256 px, batch 1, {r['levers']}: {outcome}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"estimates": rows, "measured": measured}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
