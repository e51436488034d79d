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
shipped attribute classifier), per-prompt diversity (:mod:`fdistill.metrics.diversity`) and samples/s including
the decode (:class:`~fdistill.evaluation.text.TextJudge` in the one sampler loop). The student exports as the
teacher's stock pipeline class (``StableDiffusionPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``,
``PixArtAlphaPipeline``, ``PixArtSigmaPipeline`` or ``SanaPipeline``).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from fdistill.containers import Batch, Networks
from fdistill.data.captions import CaptionedShapes, caption, combinations, read_prompts
from fdistill.errors import ConfigError
from fdistill.evaluation.loop import evaluate_samplers
from fdistill.evaluation.text import GRID_PROMPTS, GRID_SEEDS, PromptSet, TextJudge
from fdistill.networks.denoisers import Denoiser, UNetDenoiser
from fdistill.pipelines.parts import LatentPipelineParts
from fdistill.pipelines.transformers import TransformerDenoiser
from fdistill.tasks.base import Task, check_sample_counts
from fdistill.teachers import frozen_dtype, prompt_length, teacher_directory

TEXT_DATA = ("captioned_shapes", "prompts")
REAL_IMAGES = 4000  # captioned-shapes images encoded for the objectives that read real data
REFERENCE_IMAGES = 2000  # captioned-shapes reference images of the FD, per prompt set
REFERENCE_SEED = 1  # the reference images are not the training images
DEFAULT_CLIP = ("ViT-g-14", "laion2b_s34b_b88k")  # the zero-shot protocol's CLIP


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
        check_inputs(cfg, needs_real_data=False)
        self.records = _prompt_records(cfg.data.path) if cfg.data.kind == "prompts" else []
        root, source = located
        self.parts = LatentPipelineParts.load(root, source, teacher.network,
                                              prompt_length(root, cfg.teacher.max_sequence_length), frozen_dtype(cfg))
        if cfg.data.cache_dir:
            self.parts.cache_in(cfg.data.cache_dir)
        self.negative = self.parts.embed_negative(cfg.teacher.negative_prompt)
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
        return training_prompts(self.cfg, self.records)

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

    def batches(self, needs_real_data: bool, device=None):
        """Prompt embeddings drawn uniformly (with their images' latents when ``needs_real_data``), from torch's
        global RNG, which the trainer seeds per step. The data are prepared here, with the encoders on ``device``
        (from ``data.cache_dir`` where it holds them), so that problems show before training starts; the encoders
        then leave the device."""
        with self.parts.on(device):
            if needs_real_data:
                latents, prompts = self.real_data
                distinct = list(dict.fromkeys(prompts))  # one embedding per prompt, not per image
                position = {prompt: i for i, prompt in enumerate(distinct)}
                prompt_of = torch.tensor([position[p] for p in prompts])
                return _stream(self.cfg.train.batch_size, self.parts.embed(distinct).cpu(), latents, prompt_of)
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
        return fd_features(self.cfg)

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
        """The sampler loop with the text judge: every sampler (the student at each step count, the teacher's
        multi-step sampler with the same guidance) on every prompt set, prompt ``i % P`` and seed ``eval.seed``
        for sample ``i``."""
        ec, tc = self.cfg.eval, self.cfg.teacher
        guidance = {"guidance_scale": tc.guidance_scale, "negative_prompt": tc.negative_prompt}
        with self.parts.on(nets.device):
            judge = TextJudge(self.prompt_sets(), self.parts, self.clip(nets.device), self.features, nets.device,
                              guidance, ec.batch_size)
            return evaluate_samplers(nets, ec, judge, run_dir, progress)

    @torch.no_grad()
    def preview(self, nets: Networks, path: Path) -> None:
        """One-step student samples of the first training prompts, one prompt per row."""
        from torchvision.utils import save_image

        prompts = [p for p in self.training_prompts[:GRID_PROMPTS] for _ in range(GRID_SEEDS)]
        g = torch.Generator().manual_seed(self.cfg.eval.seed)
        student = nets.student.servable()
        with self.parts.on(nets.device) as parts:
            cond = parts.embed(prompts)
            latents = student(student.noise(len(prompts), generator=g).to(nets.device), cond)
            images = parts.decode(latents)
        save_image(images.cpu().clamp(-1, 1) / 2 + 0.5, path, nrow=GRID_SEEDS)

    def export(self, student, out_dir: Path, metadata: dict, in_place: bool = False) -> Path:
        from fdistill.pipelines.export import export_pipeline

        return export_pipeline(student, out_dir, metadata, self.parts, in_place)


def _stream(size: int, conditions: torch.Tensor, latents: torch.Tensor | None = None,
            prompt_of: torch.Tensor | None = None):
    """Batches of uniformly drawn prompts, or of real images (``latents``) with their prompts' conditions
    (``conditions[prompt_of[i]]`` for image ``i``)."""
    while True:
        if latents is None:
            yield Batch(size=size, cond=conditions[torch.randint(len(conditions), (size,))])
        else:
            index = torch.randint(len(latents), (size,))
            yield Batch(size=size, real=latents[index], cond=conditions[prompt_of[index]])


def fd_features(cfg) -> str:
    """The feature network of the FD: ``eval.features``, by default the shapes classifier on the captioned shapes."""
    return cfg.eval.features or ("fdistill-shapes" if cfg.data.kind == "captioned_shapes" else "inception")


def check_inputs(cfg, needs_real_data: bool) -> None:
    """What the configuration and the data files decide, checked before any weight loads: the prompt file, real
    images for an objective that reads them, and enough evaluation images for an FD."""
    if cfg.data.kind not in TEXT_DATA:
        raise ConfigError(f"data.kind={cfg.data.kind!r} has no prompts; a text-to-image teacher takes "
                          f"{' or '.join(TEXT_DATA)}")
    if (cfg.data.kind == "prompts") != bool(cfg.data.path):
        raise ConfigError("data.path (a prompt file) is read with data.kind=prompts, and only then")
    if needs_real_data and real_image_count(cfg) == 0:
        raise ConfigError(f"this objective reads real images but {cfg.data.path} names none; add an 'image' column "
                          "or choose an objective without real-data terms")
    check_sample_counts(cfg, fd_features(cfg), fd_during_training=False)


def training_prompts(cfg, records=None) -> list[str]:
    """The distinct training prompts of ``data`` (``records``: the prompt file's, when already read)."""
    if cfg.data.kind == "captioned_shapes":
        return CaptionedShapes(split="train").prompts
    return list(dict.fromkeys(r.prompt for r in (records or _prompt_records(cfg.data.path))))


def real_image_count(cfg) -> int:
    """How many real images the objectives that read them get: the captioned shapes drawn, or the prompt file's
    records that name an image."""
    if cfg.data.kind == "captioned_shapes":
        return REAL_IMAGES
    return sum(r.image is not None for r in _prompt_records(cfg.data.path))


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

