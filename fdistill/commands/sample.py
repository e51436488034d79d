"""Draw samples from a student or a teacher: ``python sample.py --model MODEL --num N --out OUT``.

``MODEL`` is an exported student (``export.py``; sampled through diffusers), a run directory (its student, or
its teacher with ``--teacher``), a diffusers teacher directory, or ``embedded`` (the shipped digits teacher).
``--run`` is another name for ``--model``. Students sample with ``--steps`` 1..(the number of times they were
trained with); teachers integrate the probability-flow ODE with ``--steps`` Euler steps (DDIM; default 35), or
a run's teacher with its evaluation sampler.

Images: ``OUT`` is a folder (one PNG per image, 000000.png, ...), a ``.png`` grid, or a ``.npz`` holding
``images`` (uint8, N x H x W x C), ``labels`` (-1 for an unconditional model), ``seed`` and ``nfe``. Runs on
2-D data write ``.npz`` (key ``samples``) or a ``.png`` scatter plot.

Class-conditional models draw ``--class-labels`` in turn (``3`` or ``0,5,7``); by default image ``i`` gets label
``i % C`` over the ``C`` data classes. The last class embedding is the null (unconditional) class, which is only
drawn when asked for. Text-to-image models take ``--prompt TEXT`` (repeatable) or ``--prompts FILE`` (``.txt``,
``.csv`` or ``.jsonl``), image ``i`` getting prompt ``i % P``; teachers also take ``--guidance-scale`` and
``--negative-prompt`` (default: the run's, or no guidance for a pipeline directory). Students are never guided.

Seeds: one ``torch.Generator`` seeded with ``--seed`` draws all the noise, batch by batch (each batch's input
noise, then the fresh noise of its multi-step sampling). The same seed and ``--batch-size`` give the same
images, whether an exported student or the run directory it came from is sampled.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fdistill.cli import user_errors
from fdistill.errors import ConfigError
from fdistill.evaluation import sampling, write_png_folder

DEFAULT_TEACHER_STEPS = 35
DEFAULT_IMAGE_BATCH = 250


@dataclass
class Sampler:
    """What to sample: ``draw(n, labels, generator)`` gives ``n`` images in [0, 1] (or ``n`` 2-D samples) and
    the number of network evaluations it took per sample."""

    name: str  # "student" or "teacher"
    draw: Callable[[int, list | None, torch.Generator], tuple[torch.Tensor, int]]  # conditions: labels or prompts
    images: bool
    num_class_embeds: int | None = None
    num_classes: int | None = None  # data classes: the labels drawn by default
    text: bool = False  # conditioned on prompts


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` model output to ``[0, 1]`` images, exactly as diffusers' ``ConsistencyModelPipeline`` does."""
    return (x / 2 + 0.5).clamp(0, 1)


def _class_info(net) -> tuple[int | None, int | None]:
    """``(num_class_embeds, num_classes)`` of a denoiser; fdistill's convention makes the last class embedding
    the null class, so the data classes are the others."""
    embeds = net.num_class_embeds
    return embeds, (max(embeds - 1, 1) if embeds else None)


def _check_steps(steps: int, max_steps: int) -> None:
    if not 1 <= steps <= max_steps:
        raise ConfigError(f"--steps {steps}: this student samples with 1..{max_steps} steps")


def _label_tensor(labels, device):
    return None if labels is None else torch.tensor(labels, dtype=torch.long, device=device)


def pipeline_sampler(model_dir: Path, steps: int | None, device) -> Sampler:
    """An exported student, sampled through plain diffusers at its first ``steps`` sampling timesteps."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    info = json.loads((model_dir / "fdistill.json").read_text())
    diffusers_logging.disable_progress_bar()
    pipe = DiffusionPipeline.from_pretrained(model_dir, **info.get("load_kwargs", {})).to(device)
    pipe.set_progress_bar_config(disable=True)
    steps = 1 if steps is None else steps
    times = info["student_times"]
    _check_steps(steps, len(times))

    if info.get("text_to_image"):
        # the export's own call: a flow-matching student steps through its sigmas, an LCM one its timesteps
        call = {**info["call"], info["step_argument"]: info["steps"][:steps]}

        def draw_text(n, prompts, generator):
            return pipe(prompt=prompts, generator=generator, output_type="pt", **call).images, steps

        return Sampler("student", draw_text, True, text=True)

    if "pipeline_steps" in info:  # a pipeline that takes no timesteps samples at the step counts its spacing fits
        if steps not in info["pipeline_steps"]:
            raise ConfigError(f"--steps {steps}: {type(pipe).__name__} samples this student at "
                              f"{info['pipeline_steps']} steps only (it takes no timesteps)")

        def draw_latent(n, labels, generator):
            images = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=steps, generator=generator,
                          output_type="np").images
            return torch.from_numpy(images).permute(0, 3, 1, 2), steps

        embeds = info["num_class_embeds"]
        return Sampler("student", draw_latent, True, embeds, info.get("num_classes", embeds - 1))

    def draw(n, labels, generator):
        images = pipe(batch_size=n, class_labels=labels, num_inference_steps=None, timesteps=times[:steps],
                      generator=generator, output_type="pt").images
        return images, steps

    embeds = pipe.unet.config.num_class_embeds
    classes = info.get("num_classes", max(embeds - 1, 1) if embeds else None)
    return Sampler("student", draw, True, embeds, classes)


def _conditioning(parts, device):
    """Conditions to network inputs (prompts through the text encoder, labels as a tensor), and network outputs to
    [0, 1] images (latents through the VAE of a latent model's pipeline ``parts``)."""
    def labels(given):
        return _label_tensor(given, device)

    if parts is None:
        return labels, to_unit
    parts.to(device)
    return (parts.embed if parts.text else labels), (lambda latents: to_unit(parts.decode(latents)))


def student_sampler(student, steps: int | None, renoise: str | None, device, text_parts=None) -> Sampler:
    """A run's student, drawn as the evaluation draws it (:func:`fdistill.evaluation.sampling.student_sampler`,
    with the run's re-noising mode: students of diffusers teachers re-noise as the exported pipeline does); a
    latent student's samples are decoded by ``text_parts``' VAE."""
    steps = 1 if steps is None else steps
    _check_steps(steps, student.max_steps)
    student.eval()
    return _served(sampling.student_sampler(student, steps, renoise, device), student.net, text_parts, device)


def teacher_sampler(teacher, steps: int, method: str, device, text_parts=None) -> Sampler:
    """A teacher's probability-flow ODE sampler, drawn as the evaluation draws it
    (:func:`fdistill.evaluation.sampling.teacher_sampler`)."""
    if steps < 1:
        raise ConfigError(f"--steps {steps}: a teacher needs at least 1 ODE step")
    teacher.eval()
    return _served(sampling.teacher_sampler(teacher, steps, method, device), teacher, text_parts, device)


def _served(sampler: sampling.Sampler, net, text_parts, device) -> Sampler:
    """``sampler`` of the network ``net`` taking this command's conditions (labels or prompts) and giving
    [0, 1] images (decoded by ``text_parts``' VAE for a latent model), or 2-D samples as they are."""
    images = len(net.sample_shape) > 1
    condition, output = _conditioning(text_parts, device)

    def draw(n, conditions, generator):
        x, nfe = sampler.draw(n, condition(conditions), generator)
        return (output(x) if images else x), nfe

    return Sampler(sampler.model, draw, images, *_class_info(net), text=text_parts is not None and text_parts.text)


def guided_text_teacher(teacher, text_parts, scale: float, negative_prompt: str, interval=None):
    """The unguided text ``teacher`` guided with ``scale`` and ``negative_prompt`` (none at scale 1)."""
    from fdistill.networks.guidance import GuidedDenoiser

    if scale == 1.0 and interval is None:
        return teacher
    negative = text_parts.embed_negative(negative_prompt)
    return GuidedDenoiser(teacher, scale, None if interval is None else tuple(interval),
                          lambda cond: negative.to(cond.device).expand(len(cond), -1, -1))


def open_model(model: str, teacher: bool, steps: int | None, device, guidance_scale: float | None = None,
               negative_prompt: str | None = None) -> Sampler:
    """The sampler for ``--model``: an exported student, a run, a diffusers teacher or the embedded teacher."""
    from fdistill.pipelines.loading import load_diffusers_teacher
    from fdistill.teachers import EMBEDDED_TEACHER_DIR, prompt_length

    path = EMBEDDED_TEACHER_DIR if model == "embedded" else Path(model)
    if not path.is_dir():
        raise ConfigError(f"--model {model}: directory not found (give an exported student, a run directory, a "
                          "diffusers model directory or 'embedded')")
    text_guidance = guidance_scale is not None or negative_prompt is not None

    def refuse_text_guidance():
        if text_guidance:
            raise ConfigError("--guidance-scale/--negative-prompt apply to text-to-image teachers; this one is not")

    if (path / "fdistill.json").is_file():
        if teacher:
            raise ConfigError(f"{path} is an exported student and holds no teacher; drop --teacher")
        return pipeline_sampler(path, steps, device)
    if (path / "config.yaml").is_file():
        from fdistill.run import load_run

        cfg, nets, task = load_run(path, device=device)
        text_parts = getattr(task, "parts", None)
        if teacher:
            teacher_steps = cfg.eval.teacher_steps if steps is None else steps
            guided = nets.teacher
            if text_parts is None or not text_parts.text:
                refuse_text_guidance()
            elif text_guidance:
                tc = cfg.teacher
                guided = guided_text_teacher(
                    task.teacher, text_parts, tc.guidance_scale if guidance_scale is None else guidance_scale,
                    tc.negative_prompt if negative_prompt is None else negative_prompt, tc.guidance_interval)
            return teacher_sampler(guided, teacher_steps, cfg.eval.teacher_sampler, device, text_parts)
        return student_sampler(nets.student.servable(), steps, cfg.eval.renoise, device, text_parts)
    if (path / "model_index.json").is_file() or (path / "scheduler_config.json").is_file():
        from fdistill.pipelines.parts import LatentPipelineParts

        teacher_net = load_diffusers_teacher(path).to(device)
        teacher_steps = DEFAULT_TEACHER_STEPS if steps is None else steps
        if not teacher_net.text_conditioned:
            refuse_text_guidance()
            latent = (path / "vae").is_dir()  # a class-conditional latent pipeline
            vae = LatentPipelineParts.load(path, str(path), teacher_net.network) if latent else None
            return teacher_sampler(teacher_net, teacher_steps, "euler", device, vae)

        text_parts = LatentPipelineParts.load(path, str(path), teacher_net.network, prompt_length(path))
        guided = guided_text_teacher(teacher_net, text_parts, 1.0 if guidance_scale is None else guidance_scale,
                                     negative_prompt or "")
        return teacher_sampler(guided, teacher_steps, "euler", device, text_parts)
    raise ConfigError(f"{path} is not a model directory: config.yaml (a run), fdistill.json (an exported student) "
                      "and model_index.json (a diffusers pipeline) not found")


def parse_prompts(prompts: list[str] | None, prompt_file: str | None, n: int, sampler: Sampler) -> list[str] | None:
    """Per-image prompts of a text-to-image model: ``--prompt`` or ``--prompts`` in turn."""
    if not sampler.text:
        if prompts or prompt_file:
            raise ConfigError("--prompt/--prompts given, but this model is not text-conditioned")
        return None
    if bool(prompts) == bool(prompt_file):
        raise ConfigError("this model is text-to-image: give --prompt TEXT (repeatable) or --prompts FILE")
    if prompt_file:
        from fdistill.data.captions import read_prompts

        try:
            prompts = [r.prompt for r in read_prompts(prompt_file)]
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"--prompts: {e}") from None
    return [prompts[i % len(prompts)] for i in range(n)]


def parse_labels(text: str | None, n: int, sampler: Sampler) -> list[int] | None:
    """Per-image labels: ``--class-labels`` repeated in turn, or ``i % num_classes``; ``None`` if unconditional."""
    if sampler.num_class_embeds is None:
        if text is not None:
            raise ConfigError("--class-labels given, but this model is not class-conditional")
        return None
    if text is None:
        return [i % sampler.num_classes for i in range(n)]
    try:
        given = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--class-labels {text!r}: give integers separated by commas, e.g. 0,3,7") from None
    bad = [c for c in given if not 0 <= c < sampler.num_class_embeds]
    if bad:
        raise ConfigError(f"--class-labels {bad}: this model has labels 0..{sampler.num_class_embeds - 1} "
                          f"({sampler.num_class_embeds - 1} is the null class)")
    return [given[i % len(given)] for i in range(n)]


def scatter_png(samples: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if samples.shape[1] != 2:
        raise ConfigError(f"a scatter plot needs 2-D samples, these have {samples.shape[1]} dimensions; use .npz")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _pil(image: np.ndarray):
    """One H x W x C uint8 image as PIL: grayscale as mode "L", three channels as "RGB"."""
    from PIL import Image

    if image.shape[2] == 1:
        return Image.fromarray(image[:, :, 0], mode="L")
    if image.shape[2] == 3:
        return Image.fromarray(image, mode="RGB")
    raise ConfigError(f"PNG output needs 1 or 3 channels, these images have {image.shape[2]}; use .npz")


def image_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """N x H x W x C images on a near-square grid with white ``pad``-pixel gaps (torchvision's ``make_grid``)."""
    from torchvision.utils import make_grid

    channels = images.shape[3]
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    grid = make_grid(nchw, nrow=math.ceil(math.sqrt(len(images))), padding=pad, pad_value=255)
    return grid[:channels].permute(1, 2, 0).numpy()  # make_grid turns one channel into three


def write_images(images: np.ndarray, labels, out: Path, seed: int, nfe: int, text: bool = False) -> None:
    """Images with their conditions: a ``.npz`` (``labels``, or ``prompts`` for a text model), a ``.png`` grid, or
    a folder of PNGs (with ``prompts.txt``, one line per image in file order, for a text model: the prompt file
    ``eval/clip_score.py`` reads)."""
    if out.suffix == ".npz":
        if text:
            np.savez(out, images=images, prompts=np.asarray(labels), seed=seed, nfe=nfe)
            return
        labels = np.full(len(images), -1) if labels is None else np.asarray(labels)
        np.savez(out, images=images, labels=labels, seed=seed, nfe=nfe)
    elif out.suffix == ".png":
        _pil(image_grid(images)).save(out)
    else:
        write_png_folder(torch.from_numpy(images).permute(0, 3, 1, 2), out)
        if text:
            (out / "prompts.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in labels))


def main(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", "--run", dest="model", required=True,
                        help="exported student, run directory, diffusers teacher directory, or 'embedded'")
    parser.add_argument("--num", type=int, default=4000)
    parser.add_argument("--out", required=True, help="images: folder, .png grid or .npz; 2-D runs: .npz or .png")
    parser.add_argument("--steps", type=int,
                        help=f"student steps (default 1) or teacher ODE steps (default {DEFAULT_TEACHER_STEPS}, "
                             "a run's teacher: its eval.teacher_steps)")
    parser.add_argument("--class-labels", help="comma-separated labels used in turn (default: i %% classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int,
                        help=f"samples per batch (default {DEFAULT_IMAGE_BATCH} images, all 2-D samples at once)")
    parser.add_argument("--teacher", action="store_true", help="sample a run's teacher instead of its student")
    parser.add_argument("--prompt", action="append", help="text-to-image: a prompt (repeat for several)")
    parser.add_argument("--prompts", help="text-to-image: a .txt/.csv/.jsonl prompt file")
    parser.add_argument("--guidance-scale", type=float, help="text teachers: classifier-free guidance scale")
    parser.add_argument("--negative-prompt", help="text teachers: the prompt of the unconditional pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    with user_errors():
        out = Path(args.out)
        if args.num < 1 or (args.batch_size is not None and args.batch_size < 1):
            raise ConfigError("--num and --batch-size must be at least 1")
        if not args.teacher and (args.guidance_scale is not None or args.negative_prompt is not None):
            raise ConfigError("--guidance-scale/--negative-prompt apply to teachers (--teacher); students are "
                              "never guided")
        sampler = open_model(args.model, args.teacher, args.steps, torch.device(args.device), args.guidance_scale,
                             args.negative_prompt)
        if not sampler.images and out.suffix not in (".npz", ".png"):
            raise ConfigError(f"--out must end in .npz or .png for 2-D samples, got {out.name}")
        if sampler.images and out.suffix not in (".npz", ".png", ""):
            raise ConfigError(f"--out must be a folder, a .png grid or a .npz file, got {out.name}")
        if sampler.text and args.class_labels is not None:
            raise ConfigError("--class-labels given, but this model is text-to-image; give --prompt or --prompts")
        prompts = parse_prompts(args.prompt, args.prompts, args.num, sampler)
        labels = prompts if sampler.text else parse_labels(args.class_labels, args.num, sampler)
        batch = args.batch_size or (DEFAULT_IMAGE_BATCH if sampler.images else args.num)
        start = time.time()
        x, nfe = sampling.draw_samples(sampler.draw, args.num, torch.Generator().manual_seed(args.seed), labels, batch,
                                       sys.stderr.isatty(), f"sampling ({sampler.name})")
        rate = args.num / (time.time() - start)
        out.parent.mkdir(parents=True, exist_ok=True)
        if sampler.images:
            images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            write_images(images, labels, out, args.seed, nfe, sampler.text)
        elif out.suffix == ".npz":
            np.savez(out, samples=x.float().numpy(), nfe=nfe, seed=args.seed)
        else:
            scatter_png(x.float().numpy(), out, f"{sampler.name}, {nfe} NFE")
    what = "images" if sampler.images else "samples"
    print(f"wrote {args.num} {what} ({nfe} NFE, {rate:.1f} samples/s) to {out}")


if __name__ == "__main__":
    main()
