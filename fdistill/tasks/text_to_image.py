"""The text-to-image task: a latent diffusers pipeline teacher (text encoders, VAE, and a
``UNet2DConditionModel`` or a diffusion transformer of :mod:`fdistill.pipelines.transformers`) and a prompt set.

Students and fake scores are copies of the teacher's denoising network and work on VAE latents; their condition
is the prompt's encoding as the stock pipeline computes it
(:class:`~fdistill.pipelines.parts.LatentPipelineParts`), computed once per distinct prompt. The teacher alone is
guided, with the negative prompt (``teacher.negative_prompt``) as the unconditional input. Training prompts come
from ``data.kind``:

* ``captioned_shapes``: the 40 training captions of the procedural captioned shapes, with their images as real
  data; the run is judged on those prompts and, separately, on the 8 held-out attribute combinations;
* ``prompts``: a ``.txt``/``.csv``/``.jsonl`` file at ``data.path``; images named beside the prompts are real
  data, VAE-encoded once.

The evaluation decodes every sampler's latents with the VAE and reports, on the same prompts and seeds: CLIP score
(open_clip, ``eval.clip_model``), FD against reference images (``eval.features``), compositional accuracy (on the
captioned shapes: the fraction of images whose colour, shape and position all match the prompt, read by the
shipped attribute classifier) and samples/s including the decode. The student exports as the teacher's stock
pipeline class (``StableDiffusionPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``PixArtAlphaPipeline``,
``PixArtSigmaPipeline`` or ``SanaPipeline``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from fdistill.containers import Batch, Networks
from fdistill.data.captions import CaptionedShapes, caption, combinations, read_prompts
from fdistill.errors import ConfigError
from fdistill.evaluation import student_samples, teacher_samples, write_png_folder
from fdistill.networks.denoisers import Denoiser, UNetDenoiser
from fdistill.pipelines.parts import LatentPipelineParts
from fdistill.pipelines.transformers import TransformerDenoiser
from fdistill.tasks.base import Task
from fdistill.teachers import prompt_length, teacher_directory

TEXT_DATA = ("captioned_shapes", "prompts")
REAL_IMAGES = 4000  # captioned-shapes images encoded for the objectives that read real data
REFERENCE_IMAGES = 2000  # captioned-shapes reference images of the FD, per prompt set
REFERENCE_SEED = 1  # the reference images are not the training images
DEFAULT_CLIP = ("ViT-g-14", "laion2b_s34b_b88k")  # the zero-shot protocol's CLIP
GRID_PROMPTS, GRID_SEEDS = 8, 4


@dataclass
class PromptSet:
    """Prompts a run is evaluated on, the attribute combinations they name (captioned shapes only) and the
    reference images of their FD."""

    name: str
    prompts: list[str]
    reference: object
    combinations: list[tuple[int, int, int]] | None = None


class TextToImageTask(Task):
    teacher: UNetDenoiser | TransformerDenoiser
    unread = {**{f"model.{name}": "the MLPs of analytic teachers read it; students copy the teacher's UNet"
                 for name in ("hidden", "depth", "sigma_data")},
              "log.fd_every": "class-conditional image runs read it; text-to-image runs report at the end"}

    def __init__(self, cfg, teacher: UNetDenoiser | TransformerDenoiser):
        super().__init__(cfg, teacher)
        located = teacher_directory(cfg)
        if located is None:
            raise ConfigError(f"teacher.kind={cfg.teacher.kind} builds no text-to-image pipeline; use "
                              "teacher.kind=pretrained with a pipeline directory, or embedded_t2i")
        if cfg.data.kind not in TEXT_DATA:
            raise ConfigError(f"data.kind={cfg.data.kind!r} has no prompts; a text-to-image teacher takes "
                              f"{' or '.join(TEXT_DATA)}")
        if (cfg.data.kind == "prompts") != bool(cfg.data.path):
            raise ConfigError("data.path (a prompt file) is read with data.kind=prompts, and only then")
        self.records = _prompt_records(cfg.data.path) if cfg.data.kind == "prompts" else []
        root, source = located
        self.parts = LatentPipelineParts.load(root, source, teacher.network,
                                              prompt_length(root, cfg.teacher.max_sequence_length))
        self.negative = self.parts.embed([cfg.teacher.negative_prompt])
        self._clip = None  # the CLIP score's model, loaded at the first evaluation

    def unconditional(self, cond: torch.Tensor) -> torch.Tensor:
        """The negative prompt's embedding for each condition in ``cond`` (guidance's unconditional input)."""
        return self.negative.to(cond.device).expand(len(cond), -1, -1)

    def trainable_copy(self) -> Denoiser:
        return self.teacher.copy_network().train().requires_grad_(True)

    def condition_probe(self, n: int) -> torch.Tensor:
        return self.parts.embed([""] * n)

    @property
    def pixel_size(self) -> int:
        return self.teacher.sample_shape[-1] * self.parts.vae_scale_factor

    @cached_property
    def training_prompts(self) -> list[str]:
        if self.cfg.data.kind == "captioned_shapes":
            return CaptionedShapes(split="train").prompts
        return list(dict.fromkeys(r.prompt for r in self.records))

    @cached_property
    def real_data(self) -> tuple[torch.Tensor, list[str]]:
        """Latents of the real images and their prompts (for objectives that read real data)."""
        if self.cfg.data.kind == "captioned_shapes":
            data = CaptionedShapes(REAL_IMAGES, self.pixel_size, split="train", seed=self.cfg.run.seed)
            images, prompts = data.images, data.captions
        else:
            pairs = [r for r in self.records if r.image is not None]
            if not pairs:
                raise ConfigError(f"this objective reads real images but {self.cfg.data.path} names none; add an "
                                  "'image' column or choose an objective without real-data terms")
            images = torch.stack([_load_image(r.image, self.pixel_size) for r in pairs])
            prompts = [r.prompt for r in pairs]
        g = torch.Generator().manual_seed(self.cfg.run.seed)
        latents = self.parts.encode_all(images, g)
        return latents, prompts

    def batches(self, needs_real_data: bool):
        """Prompt embeddings drawn uniformly (with their images' latents when ``needs_real_data``), from torch's
        global RNG, which the trainer seeds per step. The data are prepared here, so that problems show before
        training starts."""
        if needs_real_data:
            latents, prompts = self.real_data
            return _stream(self.cfg.train.batch_size, self.parts.embed(prompts).cpu(), latents)
        return _stream(self.cfg.train.batch_size, self.parts.embed(self.training_prompts).cpu())

    # -- evaluation -------------------------------------------------------------------------------------------

    def prompt_sets(self) -> list[PromptSet]:
        """The training prompts, and on the captioned shapes the held-out combinations too."""
        ec = self.cfg.eval
        if self.cfg.data.kind != "captioned_shapes":
            reference = ec.reference
            if reference is None:
                images = [r.image for r in self.records if r.image is not None]
                if not images:
                    raise ConfigError(f"no FD reference: set eval.reference=<image folder or .npz statistics> or "
                                      f"name images in {self.cfg.data.path}")
                reference = torch.stack([_load_image(p, self.pixel_size) for p in images])
            return [PromptSet("prompts", self.training_prompts, reference)]
        if ec.reference is not None:
            raise ConfigError("eval.reference is not read with data.kind=captioned_shapes, whose reference images are "
                              "rendered for each prompt set; remove it")
        sets = []
        for split, name in (("train", "training prompts"), ("heldout", "held-out prompts")):
            combos = combinations(split)
            reference = CaptionedShapes(REFERENCE_IMAGES, self.pixel_size, split, seed=REFERENCE_SEED)
            sets.append(PromptSet(name, [caption(*c) for c in combos], reference, combos))
        return sets

    @property
    def features(self) -> str:
        return self.cfg.eval.features or ("fdistill-shapes" if self.cfg.data.kind == "captioned_shapes"
                                          else "inception")

    def clip(self, device):
        """The CLIP model of the score, on ``device`` (loaded once)."""
        from fdistill.metrics.clip_score import load_clip, load_shapes_clip

        if self._clip is not None:
            self._clip.model.to(device)
            return self._clip
        ec = self.cfg.eval
        if ec.clip_model is None and ec.clip_pretrained is not None:
            raise ConfigError("eval.clip_pretrained is read with eval.clip_model; set both, or neither")
        if ec.clip_model is None and self.cfg.data.kind == "captioned_shapes":
            self._clip = load_shapes_clip(device)
            return self._clip
        model, pretrained = (ec.clip_model, ec.clip_pretrained) if ec.clip_model else DEFAULT_CLIP
        try:
            self._clip = load_clip(model, pretrained, device)
            return self._clip
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            raise ConfigError(f"eval.clip_model: {str(e).splitlines()[0]}") from None

    def evaluate(self, nets: Networks, run_dir: Path, progress: bool = False) -> list[dict]:
        """Every sampler (the student at each step count, the teacher's multi-step sampler with the same
        guidance) on every prompt set, under one protocol: prompt ``i % P`` and seed ``eval.seed`` for sample
        ``i``."""
        from fdistill.metrics.fid import compute_fid, load_feature_net, reference_statistics
        from fdistill.metrics.image_sources import to_uint8_nchw

        ec, cfg = self.cfg.eval, self.cfg
        self.parts.to(nets.device)
        feature_net = load_feature_net(self.features)
        samples_dir = run_dir / "samples" if ec.save_samples else None
        was_training = nets.student.training
        nets.student.eval()
        steps = [k for k in ec.student_steps if k <= nets.student.max_steps]
        results, grids, prompt_sets = [], {}, self.prompt_sets()
        for prompt_set in prompt_sets:
            reference = reference_statistics(prompt_set.reference, feature_net, "clean", progress=False)
            index = torch.arange(ec.num_samples) % len(prompt_set.prompts)
            prompts = [prompt_set.prompts[i] for i in index]
            cond = RowsOf(self.parts.embed(prompt_set.prompts).cpu(), index)
            for model, k in [("student", k) for k in steps] + [("teacher", None)]:
                start = time.time()
                if model == "student":
                    latents = student_samples(nets, ec.num_samples, k, ec.seed, ec.renoise, cond, ec.batch_size,
                                              progress)
                    nfe, extra = k, {}
                else:
                    latents, nfe = teacher_samples(nets, ec.num_samples, ec.teacher_steps, ec.teacher_sampler,
                                                   ec.seed, cond, ec.batch_size, progress)
                    extra = {"sampler": ec.teacher_sampler}
                images = torch.cat([self.parts.decode(x).float().cpu() for x in latents.split(ec.batch_size)])
                rate = ec.num_samples / (time.time() - start)
                pixels = to_uint8_nchw(images.clamp(-1, 1))
                name = f"{model}_nfe{nfe}_{prompt_set.name.split()[0]}"
                if samples_dir is not None:
                    write_png_folder(pixels, samples_dir / name)
                fd = compute_fid(pixels.permute(0, 2, 3, 1), reference, feature_net, backend="clean", progress=False)
                entry = {"model": model, "nfe": nfe, **extra, "prompts": prompt_set.name,
                         "clip_score": self._clip_score(pixels, prompts, nets.device), "fd": fd["value"]}
                if prompt_set.combinations is not None:
                    entry.update(self._compositional(pixels, [prompt_set.combinations[i] for i in index]))
                entry.update({"samples_per_second": rate, "guidance_scale": cfg.teacher.guidance_scale,
                              "negative_prompt": cfg.teacher.negative_prompt, "num_samples": ec.num_samples,
                              "seed": ec.seed, "clip_model": self.clip(nets.device).name,
                              "feature_net": fd["feature_net"],
                              "weights_hash": fd["weights_hash"], "reference": fd["reference"],
                              "num_reference": fd["num_reference"], "teacher": self.parts.source})
                results.append(entry)
                grids.setdefault((prompt_set.name, model), (pixels, prompts, f"{model}, {nfe} step"
                                                            f"{'s' if nfe > 1 else ''}"))
        nets.student.train(was_training)
        if samples_dir is not None:
            for prompt_set in prompt_sets:
                student, teacher = grids[(prompt_set.name, "student")], grids[(prompt_set.name, "teacher")]
                write_prompt_grid(student, teacher, len(prompt_set.prompts),
                                  samples_dir / f"grid_{prompt_set.name.split()[0]}.png")
        return results

    def _clip_score(self, pixels: torch.Tensor, prompts: list[str], device) -> float:
        from fdistill.metrics.clip_score import clip_score_tensors

        return clip_score_tensors(self.clip(device), pixels.float() / 127.5 - 1, prompts, device=device)

    @cached_property
    def _attribute_classifier(self):
        from fdistill.metrics.attributes import load_attribute_classifier

        return load_attribute_classifier()

    def _compositional(self, pixels: torch.Tensor, combos) -> dict:
        from fdistill.metrics.attributes import compositional_accuracy

        scores = compositional_accuracy(self._attribute_classifier, pixels.float() / 127.5 - 1, combos)
        return {"compositional_accuracy": scores["accuracy"],
                **{f"{key}_accuracy": scores[key] for key in ("colour", "shape", "position")}}

    @torch.no_grad()
    def preview(self, nets: Networks, path: Path) -> None:
        """One-step student samples of the first training prompts, one prompt per row."""
        from torchvision.utils import save_image

        prompts = [p for p in self.training_prompts[:GRID_PROMPTS] for _ in range(GRID_SEEDS)]
        g = torch.Generator().manual_seed(self.cfg.eval.seed)
        student = nets.student.servable()
        cond = self.parts.to(nets.device).embed(prompts)
        latents = student(student.noise(len(prompts), generator=g).to(nets.device), cond)
        save_image(self.parts.decode(latents).float().cpu().clamp(-1, 1) / 2 + 0.5, path, nrow=GRID_SEEDS)

    def export(self, student, out_dir: Path, metadata: dict) -> Path:
        from fdistill.pipelines.export import export_pipeline

        return export_pipeline(student, out_dir, metadata, self.parts)


class RowsOf:
    """The conditions of samples ``index``, one row of ``table`` (one embedding per distinct prompt) each,
    gathered only for the rows a sampler asks for, so that a large evaluation never holds one per sample."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        self.table, self.index = table, index

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.table[self.index[rows]]


def _stream(size: int, conditions: torch.Tensor, latents: torch.Tensor | None = None):
    while True:
        index = torch.randint(len(conditions), (size,))
        yield Batch(size=size, real=None if latents is None else latents[index], cond=conditions[index])


def _prompt_records(path: str):
    try:
        return read_prompts(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.path: {e}") from None


def _load_image(path: Path, size: int) -> torch.Tensor:
    from fdistill.data.images import load_image

    try:
        return load_image(path, size)
    except FileNotFoundError:
        raise ConfigError(f"image {path} named in the prompt file does not exist; fix the path") from None


def write_prompt_grid(student, teacher, num_prompts: int, path: Path) -> None:
    """Rows of up to ``GRID_PROMPTS`` prompts spread over the set, each written at the left, with ``GRID_SEEDS`` student
    samples and then ``GRID_SEEDS`` teacher samples; ``student``/``teacher`` are (uint8 images, prompts, title)
    with prompt ``i % num_prompts`` for image ``i``."""
    from PIL import Image, ImageDraw

    rows = min(num_prompts, GRID_PROMPTS)
    shown = [row * num_prompts // rows for row in range(rows)]  # prompts spread over the set
    scale, text_width, header, gap = 2, 240, 16, 12
    side = student[0].shape[-1] * scale
    width = text_width + 2 * GRID_SEEDS * side + gap
    canvas = Image.new("RGB", (width, header + rows * side), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (pixels, _, title) in enumerate((student, teacher)):
        left = text_width + column * (GRID_SEEDS * side + gap)
        draw.text((left + 2, 2), title, fill="black")
        for row, prompt in enumerate(shown):
            for seed in range(GRID_SEEDS):
                i = prompt + seed * num_prompts
                if i >= len(pixels):
                    continue
                image = Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).resize((side, side), Image.NEAREST)
                canvas.paste(image, (left + seed * side, header + row * side))
    for row, prompt in enumerate(shown):
        draw.text((4, header + row * side + side // 2 - 6), student[1][prompt], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
