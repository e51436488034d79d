"""The parts of a latent pipeline around its denoiser: tokenizers, text encoders and VAE.

Distillation runs on VAE latents, conditioned on the text encoders' outputs, exactly as the stock diffusers
pipeline computes them, so that a student trained here is served by that pipeline unchanged. How each class does
that is its spec's (:mod:`fdistill.pipelines.specs`): :meth:`LatentPipelineParts.embed` runs the pipeline's own
``encode_prompt`` on a pipeline built from these parts around the frozen denoiser, and
:meth:`LatentPipelineParts.decode` / :meth:`LatentPipelineParts.encode` scale latents as the pipeline does.

Embeddings are kept per prompt: a fixed prompt set is encoded once per run. With :meth:`LatentPipelineParts.cache_in`
(``data.cache_dir``) the embeddings and the latents of real images are also kept on disk
(:mod:`fdistill.pipelines.cache`), and a later run reads them instead of running the encoders. The parts stay where
they were loaded (the CPU) and visit the accelerator only while they work (:meth:`LatentPipelineParts.on`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch

from fdistill.errors import ConfigError
from fdistill.pipelines.cache import EmbeddingCache, LatentCache, text_digest, weights_digest
from fdistill.pipelines.specs import SPECS, PipelineSpec, spec_named

ENCODE_BATCH = 250  # images VAE-encoded at a time
PROMPT_BATCH = 64  # prompts encoded at a time
DECODE_PIXELS = 512 * 512  # output pixels decoded at a time (one 512 px image; 256 images at 32 px): a VAE
# decoder keeps several float32 maps of 128 channels at full size, about 0.7 GB per 512 px image


def on_meta_device(model_class, directory: Path):
    """A diffusers or transformers model built from the config in ``directory`` on the meta device."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        if hasattr(model_class, "load_config"):  # diffusers
            return model_class.from_config(model_class.load_config(directory))
        import transformers

        return model_class._from_config(transformers.AutoConfig.from_pretrained(directory))


def vae_scale_factor(vae_config) -> int:
    """The VAE's spatial downsampling factor, as pipelines compute it: a video VAE's ``scale_factor_spatial``
    (``AutoencoderKLWan``), else ``2 ** (len(block_out_channels) - 1)`` (``encoder_block_out_channels`` for Sana's
    ``AutoencoderDC``)."""
    if "scale_factor_spatial" in vae_config:
        return vae_config["scale_factor_spatial"]
    channels = vae_config.get("block_out_channels") or vae_config.get("encoder_block_out_channels")
    return 2 ** (len(channels) - 1)


class LatentPipelineParts:
    """Tokenizers, text encoders and VAE of a latent pipeline, loaded from ``root`` and only ever run under
    ``torch.no_grad``. Their parameters keep ``requires_grad`` as loaded, as in a stock pipeline: PyTorch's CPU
    convolutions take another kernel for frozen weights, and the decoded images would differ in the last bits
    from what plain diffusers decodes.

    ``parts`` maps component names (``tokenizer``, ``text_encoder``, ``vae``, ...) to the loaded objects; ``spec``
    is the stock pipeline class they belong to; ``denoiser`` is the pipeline's frozen denoising network and
    ``scheduler`` its scheduler, around which a text pipeline is built to encode prompts (SD3 reads its text width
    from the transformer); ``config`` holds the pipeline's own settings from ``model_index.json`` (SDXL's
    ``force_zeros_for_empty_prompt``), which the encoding pipeline and the student's export keep.

    The VAE stays in float32 whatever ``teacher.dtype``: it is small (0.1-0.3B parameters), SDXL's overflows in
    float16 (its pipeline upcasts it), Wan's pipeline card loads it in float32, and on a CPU without bfloat16
    arithmetic a bfloat16 VAE would take most of an evaluation's time. Images are decoded about one 512 px image's
    worth at a time (:meth:`decode_all`), so an evaluation batch does not hold every image's decoder activations at
    once.
    """

    def __init__(self, parts: dict, spec: PipelineSpec, source: str, denoiser,
                 max_sequence_length: int | None = None, scheduler=None, config: dict | None = None):
        self.parts, self.spec, self.source = parts, spec, source
        self.config = dict(config or {})
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.eval()
        self.vae = parts["vae"]
        self.max_sequence_length = max_sequence_length
        self._encoder = self.pipeline(denoiser, scheduler) if spec.text else None
        self._embeddings: dict[str, torch.Tensor] = {}
        self._cache_root: Path | None = None
        self._disk: EmbeddingCache | None = None

    def pipeline(self, denoiser, scheduler):
        """The stock pipeline of these parts around ``denoiser``, driven by ``scheduler``."""
        pipeline_class = self.spec.pipeline_class()
        accepted = inspect.signature(pipeline_class.__init__).parameters
        settings = {key: value for key, value in self.config.items() if key in accepted}
        components = {**self.parts, **settings, **self.spec.extra_components}
        return pipeline_class(**{self.spec.denoiser_role: denoiser}, scheduler=scheduler, **components)

    @classmethod
    def load(cls, root: Path, source: str, denoiser, max_sequence_length: int | None = None,
             dtype: torch.dtype = torch.float32, on_meta: bool = False) -> LatentPipelineParts:
        """The parts of the diffusers pipeline directory ``root`` around its ``denoiser``, the text encoders' weights
        in ``dtype`` and the VAE's in float32 (``on_meta``: built from their configs on the meta device, nothing
        loaded); a missing one is a one-line error."""
        import diffusers
        import transformers

        index = _model_index(root)
        spec = spec_named(index.get("_class_name"), type(denoiser).__name__, source)
        missing = [part for part in spec.parts if not (root / part).is_dir()]
        if missing:
            raise ConfigError(f"{source} has a latent denoiser but no {', '.join(p + '/' for p in missing)}; "
                              f"give a full {spec.name} directory (model_index.json and "
                              f"{', '.join(p + '/' for p in spec.parts)})")
        if max_sequence_length is not None and spec.max_sequence_length is None:
            readers = [name for name, other in SPECS.items() if other.max_sequence_length is not None]
            raise ConfigError(f"teacher.max_sequence_length is read by T5 pipelines ({', '.join(readers)}), and "
                              f"{source} is a {spec.name}; remove it")
        parts = {}
        try:
            for part in spec.parts + spec.optional_parts:
                library, class_name = index.get(part) or (None, None)
                if class_name is None or not (root / part).is_dir():
                    parts[part] = None
                elif part.startswith("tokenizer"):
                    parts[part] = getattr(transformers, class_name).from_pretrained(root / part)
                elif on_meta:
                    parts[part] = on_meta_device(getattr(transformers if library == "transformers" else diffusers,
                                                         class_name), root / part)
                elif library == "transformers":
                    parts[part] = getattr(transformers, class_name).from_pretrained(root / part, dtype=dtype)
                else:  # the VAE: float32 whatever ``dtype`` (see the class docstring)
                    parts[part] = getattr(diffusers, class_name).from_pretrained(root / part,
                                                                                 torch_dtype=torch.float32)
            scheduler_class = (index.get("scheduler") or (None, "DDPMScheduler"))[1]
            scheduler = getattr(diffusers, scheduler_class).from_pretrained(root / "scheduler") if spec.text else None
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source}: cannot load the pipeline's text encoders, tokenizers, VAE or scheduler "
                              f"({str(e).splitlines()[0]}); re-download the pipeline") from None
        settings = {key: value for key, value in index.items() if not key.startswith("_") and key not in parts
                    and not _is_component(value)}
        return cls(parts, spec, source, denoiser, max_sequence_length or spec.max_sequence_length, scheduler,
                   settings)

    def to(self, device) -> LatentPipelineParts:
        for part in self.parts.values():
            if isinstance(part, torch.nn.Module):
                part.to(device)
        return self

    @contextmanager
    def on(self, device):
        """The parts on ``device`` inside the block (``None``: where they are), back where they were after it."""
        home = self.device
        self.to(device if device is not None else home)
        try:
            yield self
        finally:
            self.to(home)

    def cache_in(self, root: str | Path) -> None:
        """Keep prompt embeddings and real images' latents on disk under ``root`` too, keyed by the weights that
        compute them (:mod:`fdistill.pipelines.cache`)."""
        self._cache_root = Path(root)
        if self.text:
            encoders = [part for name, part in self.parts.items() if name != "vae" and part is not None]
            settings = {"pipeline": self.spec.name, "max_sequence_length": self.max_sequence_length,
                        "config": self.config}
            self._disk = EmbeddingCache(self._cache_root, weights_digest(encoders, settings),
                                        {**settings, "source": self.source,
                                         "text_encoders": {name: type(part).__name__ for name, part in
                                                           self.parts.items() if isinstance(part, torch.nn.Module)
                                                           and name != "vae"}})

    @cached_property
    def _vae_digest(self) -> str:
        return weights_digest([self.vae], {"pipeline": self.spec.name})

    @property
    def text(self) -> bool:
        """Whether the pipeline is conditioned on text (rather than class labels)."""
        return self.spec.text

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae.config)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """The condition tensors of ``prompts`` on the parts' device, as the stock pipeline encodes them: the text
        encoder's last hidden states ``[N, L, D]`` (Stable Diffusion, no CLIP skip), or a transformer pipeline's
        hidden states packed with their pooled embedding or attention mask into ``[N, L + 1, D]``; cached per
        prompt in CPU memory, in float32 whatever the text encoders' dtype."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._embeddings))
        self._embeddings.update(self._cached_or_encoded("prompt", new, self.encode_prompts))
        return torch.stack([self._embeddings[p] for p in prompts]).to(self.device)

    def _cached_or_encoded(self, kind: str, prompts: list[str], encode) -> dict[str, torch.Tensor]:
        """float32 CPU conditions of ``prompts`` (distinct) from the disk cache, else from ``encode`` (a chunk at a
        time), which are then cached; ``kind`` tells entries of different encodings apart."""
        names = {f"{kind}-{text_digest(p)}": p for p in prompts}
        found = {names[n]: c for n, c in self._disk.get(list(names)).items()} if self._disk is not None else {}
        missing = [p for p in prompts if p not in found]
        encoded = {}
        for start in range(0, len(missing), PROMPT_BATCH):
            chunk = missing[start:start + PROMPT_BATCH]
            encoded.update(zip(chunk, encode(chunk).float().cpu(), strict=True))
        if encoded and self._disk is not None:
            by_name = {f"{kind}-{text_digest(p)}": p for p in encoded}
            self._disk.put({n: encoded[p] for n, p in by_name.items()}, by_name)
        return {**found, **encoded}

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The conditions of ``prompts`` on the parts' device, in the text encoders' dtype, not cached."""
        return self.spec.encode_prompts(self._encoder, prompts, self.device, self.max_sequence_length)

    @torch.no_grad()
    def embed_negative(self, prompt: str) -> torch.Tensor:
        """The condition ``[1, ...]`` of guidance's unconditional pass for the negative prompt ``prompt``, as the
        stock pipeline computes it (SDXL's is zeros for an empty one)."""
        if self.spec.encode_negative is None:
            return self.embed([prompt])

        def encode(prompts):
            return torch.cat([self.spec.encode_negative(self._encoder, p, self.device, self.max_sequence_length)
                              for p in prompts])

        return self._cached_or_encoded("negative", [prompt], encode)[prompt][None].to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) of latents in the denoiser's (scaled, shifted) space, un-scaled in the
        pipeline's own arithmetic, in float32."""
        latents = latents.to(self.device, self.vae.dtype)
        return self.vae.decode(self.spec.to_vae_latents(latents, self.vae.config)).sample.float()

    def decode_all(self, latents: torch.Tensor, most: int | None = None) -> torch.Tensor:
        """:meth:`decode` of any number of latents, about :data:`DECODE_PIXELS` output pixels (and at most
        ``most`` samples) at a time, as CPU images."""
        pixels = latents[0, 0].numel() * self.vae_scale_factor**2  # one sample's latent positions -> its pixels
        per_chunk = max(1, min(most or len(latents), DECODE_PIXELS // pixels))
        return torch.cat([self.decode(chunk).cpu() for chunk in latents.split(per_chunk)])

    def encode_all(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`encode` of a whole image set, a chunk at a time, as CPU latents; from the disk cache when one is
        set and holds this set (the same VAE weights, image bytes and generator state)."""
        cache = None
        if self._cache_root is not None:
            images_digest = hashlib.sha256(images.reshape(-1).contiguous().cpu().view(torch.uint8).numpy()).hexdigest()
            state = None if generator is None else hashlib.sha256(generator.get_state().numpy()).hexdigest()
            identity = {"images": images_digest, "shape": list(images.shape), "generator": state}
            cache = LatentCache(self._cache_root, weights_digest([], {"vae": self._vae_digest, **identity}))
            cached = cache.load()
            if cached is not None:
                return cached
        latents = torch.cat([self.encode(chunk, generator).cpu() for chunk in images.split(ENCODE_BATCH)])
        if cache is not None:
            cache.save(latents, {"vae": self._vae_digest, "source": self.source, "images": len(images)})
        return latents

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled (and shifted) latents of images in [-1, 1], drawn from the VAE's posterior (as the teacher was
        trained; a deterministic autoencoder such as Sana's gives its one latent), in float32."""
        encoded = self.vae.encode(images.to(self.device, self.vae.dtype))
        latents = encoded.latent_dist.sample(generator=generator) if hasattr(encoded, "latent_dist") else encoded.latent
        return self.spec.from_vae_latents(latents, self.vae.config).float()


def _model_index(root: Path) -> dict:
    """``model_index.json`` of the pipeline: its class and each part's ``[library, class]``; Stable Diffusion's
    CLIP and AutoencoderKL when there is none."""
    index_file = root / "model_index.json"
    if index_file.is_file():
        return json.loads(index_file.read_text())
    return {"tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def _is_component(value) -> bool:
    """Whether a ``model_index.json`` entry names a component (``[library, class]``, possibly ``[null, null]``)."""
    return isinstance(value, list) and len(value) == 2
