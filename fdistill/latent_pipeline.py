"""The parts of a latent text-to-image pipeline around its denoiser: tokenizer, text encoder and VAE.

Distillation runs on VAE latents, conditioned on the text encoder's hidden states, exactly as a stock diffusers
``StableDiffusionPipeline`` computes them (:meth:`LatentPipelineParts.embed` tokenizes with padding to the
tokenizer's ``model_max_length`` and takes ``text_encoder(ids)[0]``; :meth:`LatentPipelineParts.decode` divides by
the VAE's ``scaling_factor``), so a student trained here is served by that pipeline unchanged. Embeddings are
cached per prompt: a fixed prompt set is encoded once per run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fdistill.config import ConfigError

TEXT_PIPELINE_PARTS = ("tokenizer", "text_encoder", "vae")


class LatentPipelineParts:
    """Tokenizer, text encoder and VAE of a text-to-image pipeline, loaded from ``root`` and only ever run under
    ``torch.no_grad``. Their parameters keep ``requires_grad`` as loaded, as in a stock pipeline: PyTorch's CPU
    convolutions take another kernel for frozen weights, and the decoded images would differ in the last bits
    from what plain diffusers decodes."""

    def __init__(self, tokenizer, text_encoder, vae, source: str):
        self.tokenizer, self.source = tokenizer, source
        self.text_encoder, self.vae = text_encoder.eval(), vae.eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self._embeddings: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, root: Path, source: str) -> LatentPipelineParts:
        """The parts of the diffusers pipeline directory ``root``; a missing one is a one-line error."""
        import diffusers
        import transformers

        missing = [part for part in TEXT_PIPELINE_PARTS if not (root / part).is_dir()]
        if missing:
            raise ConfigError(f"{source} has a text-conditioned UNet but no {', '.join(p + '/' for p in missing)}; "
                              "give a full text-to-image pipeline directory (model_index.json, unet/, vae/, "
                              "text_encoder/, tokenizer/, scheduler/)")
        index = _model_index(root)
        try:
            tokenizer = getattr(transformers, index["tokenizer"]).from_pretrained(root / "tokenizer")
            text_encoder = getattr(transformers, index["text_encoder"]).from_pretrained(
                root / "text_encoder", dtype=torch.float32)
            vae = getattr(diffusers, index["vae"]).from_pretrained(root / "vae", torch_dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{source}: cannot load the pipeline's text encoder, tokenizer or VAE "
                              f"({str(e).splitlines()[0]}); re-download the pipeline") from None
        return cls(tokenizer, text_encoder, vae, source)

    def to(self, device) -> LatentPipelineParts:
        self.text_encoder.to(device)
        self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """``[N, L, D]`` text-encoder hidden states of ``prompts`` on the parts' device, as the pipeline's
        ``encode_prompt`` computes them with no CLIP skip; cached per prompt in CPU memory."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._embeddings))
        if new:
            ids = self.tokenizer(new, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            for prompt, hidden in zip(new, self.text_encoder(ids)[0].cpu(), strict=True):
                self._embeddings[prompt] = hidden
        return torch.stack([self._embeddings[p] for p in prompts]).to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) of latents in the denoiser's (scaled) space."""
        return self.vae.decode(latents.to(self.device, self.vae.dtype) / self.scaling_factor).sample

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1], drawn from the VAE's posterior (as the teacher was trained)."""
        posterior = self.vae.encode(images.to(self.device)).latent_dist
        return posterior.sample(generator=generator) * self.scaling_factor


def _model_index(root: Path) -> dict[str, str]:
    """Class names of the pipeline's parts, from ``model_index.json`` (CLIP and AutoencoderKL by default)."""
    import json

    defaults = {"tokenizer": "CLIPTokenizer", "text_encoder": "CLIPTextModel", "vae": "AutoencoderKL"}
    index_file = root / "model_index.json"
    if not index_file.is_file():
        return defaults
    index = json.loads(index_file.read_text())
    return {part: (index.get(part) or [None, default])[1] or default for part, default in defaults.items()}


def word_tokenizer(words: list[str], model_max_length: int) -> object:
    """A CLIP BPE tokenizer built with no downloaded files: the byte-level alphabet (and its end-of-word forms)
    plus one merge chain per word of ``words``, so that each is one token; other words fall back to pieces.
    Longer words should come first: a short word's merges ranked earlier can split a longer one."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    for word in words:
        pieces = tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"caption word {word!r} tokenizes as {pieces}; reorder the merges")
    return tokenizer
