"""The parts of a latent text-to-image pipeline around its denoiser: tokenizers, text encoders and VAE.

Distillation runs on VAE latents, conditioned on the text encoders' outputs, exactly as the stock diffusers
pipeline computes them, so that a student trained here is served by that pipeline unchanged:

* ``StableDiffusionPipeline``: :meth:`LatentPipelineParts.embed` tokenizes with padding to the tokenizer's
  ``model_max_length`` and takes ``text_encoder(ids)[0]``; :meth:`LatentPipelineParts.decode` divides by the
  VAE's ``scaling_factor``;
* the transformer pipelines (``StableDiffusion3Pipeline``, ``FluxPipeline``, ``PixArtAlphaPipeline``,
  ``PixArtSigmaPipeline``, ``SanaPipeline``): the prompt goes through the pipeline's own ``encode_prompt`` (CLIPs
  and a T5, or ``max_sequence_length`` zero tokens when SD3's T5 slot is empty; Sana's Gemma with the instruction
  prefix its ``__call__`` adds), whose hidden states travel with the pooled embedding (SD3, Flux) or the
  attention mask (PixArt, Sana) as one tensor
  (:func:`fdistill.pipelines.transformers.pack_text_condition`); latents are shifted by the VAE's
  ``shift_factor`` (when it has one) as well as scaled.

Embeddings are cached per prompt: a fixed prompt set is encoded once per run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fdistill.errors import ConfigError
from fdistill.pipelines.transformers import pack_text_condition

CLIP_AND_T5 = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae")
# the parts beside the denoiser that each supported pipeline class needs, and the optional ones
PIPELINE_PARTS = {
    "StableDiffusionPipeline": (("tokenizer", "text_encoder", "vae"), ()),
    "StableDiffusion3Pipeline": (CLIP_AND_T5, ("tokenizer_3", "text_encoder_3")),
    "FluxPipeline": (CLIP_AND_T5, ()),
    "PixArtAlphaPipeline": (("tokenizer", "text_encoder", "vae"), ()),
    "PixArtSigmaPipeline": (("tokenizer", "text_encoder", "vae"), ()),
    "SanaPipeline": (("tokenizer", "text_encoder", "vae"), ()),
    "DiTPipeline": (("vae",), ()),  # class-conditional: a VAE and no text
}
ENCODE_BATCH = 250  # images VAE-encoded at a time
# each transformer pipeline's default max_sequence_length
DEFAULT_MAX_SEQUENCE_LENGTH = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512, "PixArtAlphaPipeline": 120,
                               "PixArtSigmaPipeline": 300, "SanaPipeline": 300}


def vae_scale_factor(vae_config) -> int:
    """The VAE's downsampling factor, as pipelines compute it: ``2 ** (len(block_out_channels) - 1)``
    (``encoder_block_out_channels`` for Sana's ``AutoencoderDC``)."""
    channels = vae_config.get("block_out_channels") or vae_config.get("encoder_block_out_channels")
    return 2 ** (len(channels) - 1)


def _sd3_condition(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return pack_text_condition(hidden, pooled)


def _flux_condition(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    hidden, pooled, _ = pipe.encode_prompt(prompts, prompts, device=device, max_sequence_length=max_sequence_length)
    return pack_text_condition(hidden, pooled)


def _pixart_condition(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    hidden, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                            clean_caption=False, max_sequence_length=max_sequence_length)
    return pack_text_condition(hidden, mask)


def _sana_condition(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    import inspect

    instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    hidden, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                            clean_caption=False, max_sequence_length=max_sequence_length,
                                            complex_human_instruction=instruction)
    return pack_text_condition(hidden, mask)


# how each transformer pipeline's own encode_prompt gives one condition tensor per prompt
PROMPT_CONDITIONS = {"StableDiffusion3Pipeline": _sd3_condition, "FluxPipeline": _flux_condition,
                     "PixArtAlphaPipeline": _pixart_condition, "PixArtSigmaPipeline": _pixart_condition,
                     "SanaPipeline": _sana_condition}


class LatentPipelineParts:
    """Tokenizers, text encoders and VAE of a text-to-image pipeline, loaded from ``root`` and only ever run under
    ``torch.no_grad``. Their parameters keep ``requires_grad`` as loaded, as in a stock pipeline: PyTorch's CPU
    convolutions take another kernel for frozen weights, and the decoded images would differ in the last bits
    from what plain diffusers decodes.

    ``parts`` maps component names (``tokenizer``, ``text_encoder``, ``vae``, ...) to the loaded objects;
    ``pipeline_class`` names the stock pipeline they belong to; ``denoiser`` is the pipeline's frozen denoising
    network and ``scheduler`` its scheduler, which a transformer pipeline is built around to encode prompts (SD3
    reads its text width from the transformer).
    """

    def __init__(self, parts: dict, pipeline_class: str, source: str, denoiser=None,
                 max_sequence_length: int | None = None, scheduler=None):
        self.parts, self.pipeline_class, self.source = parts, pipeline_class, source
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.eval()
        self.vae = parts["vae"]
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = getattr(self.vae.config, "shift_factor", None)
        self.max_sequence_length = max_sequence_length
        self._encoder = None
        if pipeline_class in PROMPT_CONDITIONS:
            import diffusers

            self._encoder = getattr(diffusers, pipeline_class)(transformer=denoiser, scheduler=scheduler, **parts)
        self._embeddings: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, root: Path, source: str, denoiser=None,
             max_sequence_length: int | None = None) -> LatentPipelineParts:
        """The parts of the diffusers pipeline directory ``root``; a missing one is a one-line error."""
        import diffusers
        import transformers

        index = _model_index(root)
        pipeline_class = index.get("_class_name") or "StableDiffusionPipeline"
        if pipeline_class not in PIPELINE_PARTS:
            raise ConfigError(f"{source} is a {pipeline_class}; fdistill distils {', '.join(PIPELINE_PARTS)} "
                              "text-to-image pipelines")
        needed, optional = PIPELINE_PARTS[pipeline_class]
        missing = [part for part in needed if not (root / part).is_dir()]
        if missing:
            raise ConfigError(f"{source} has a latent denoiser but no {', '.join(p + '/' for p in missing)}; "
                              f"give a full {pipeline_class} directory (model_index.json and "
                              f"{', '.join(p + '/' for p in needed)})")
        if max_sequence_length is not None and pipeline_class not in DEFAULT_MAX_SEQUENCE_LENGTH:
            raise ConfigError(f"teacher.max_sequence_length is read by T5 pipelines "
                              f"({', '.join(DEFAULT_MAX_SEQUENCE_LENGTH)}), and {source} is a {pipeline_class}; "
                              "remove it")
        parts = {}
        try:
            for part in needed + optional:
                library, class_name = index.get(part) or (None, None)
                if class_name is None or not (root / part).is_dir():
                    parts[part] = None
                elif part.startswith("tokenizer"):
                    parts[part] = getattr(transformers, class_name).from_pretrained(root / part)
                elif library == "transformers":
                    parts[part] = getattr(transformers, class_name).from_pretrained(root / part, dtype=torch.float32)
                else:
                    parts[part] = getattr(diffusers, class_name).from_pretrained(root / part, torch_dtype=torch.float32)
            scheduler_class = (index.get("scheduler") or (None, "DDPMScheduler"))[1]
            scheduler = getattr(diffusers, scheduler_class).from_pretrained(root / "scheduler") \
                if pipeline_class in PROMPT_CONDITIONS else None
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source}: cannot load the pipeline's text encoders, tokenizers, VAE or scheduler "
                              f"({str(e).splitlines()[0]}); re-download the pipeline") from None
        if max_sequence_length is None:
            max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH.get(pipeline_class)
        return cls(parts, pipeline_class, source, denoiser, max_sequence_length, scheduler)

    def to(self, device) -> LatentPipelineParts:
        for part in self.parts.values():
            if isinstance(part, torch.nn.Module):
                part.to(device)
        return self

    @property
    def text(self) -> bool:
        """Whether the pipeline is conditioned on text (rather than class labels)."""
        return "tokenizer" in self.parts

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
        prompt in CPU memory."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._embeddings))
        if new:
            for prompt, condition in zip(new, self._encode(new).cpu(), strict=True):
                self._embeddings[prompt] = condition
        return torch.stack([self._embeddings[p] for p in prompts]).to(self.device)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        if self._encoder is not None:
            return PROMPT_CONDITIONS[self.pipeline_class](self._encoder, prompts, self.device,
                                                          self.max_sequence_length)
        tokenizer = self.parts["tokenizer"]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        return self.parts["text_encoder"](ids)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) of latents in the denoiser's (scaled, shifted) space, un-scaled in the
        pipeline's own arithmetic (``DiTPipeline`` multiplies by the reciprocal, the others divide)."""
        latents = latents.to(self.device, self.vae.dtype)
        if self.pipeline_class == "DiTPipeline":
            latents = 1 / self.scaling_factor * latents
        else:
            latents = latents / self.scaling_factor
        if self.shift_factor is not None:
            latents = latents + self.shift_factor
        return self.vae.decode(latents).sample

    def encode_all(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`encode` of a whole image set, a chunk at a time, as CPU latents."""
        return torch.cat([self.encode(chunk, generator).cpu() for chunk in images.split(ENCODE_BATCH)])

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled (and shifted) latents of images in [-1, 1], drawn from the VAE's posterior (as the teacher was
        trained; a deterministic autoencoder such as Sana's gives its one latent)."""
        encoded = self.vae.encode(images.to(self.device))
        latents = encoded.latent_dist.sample(generator=generator) if hasattr(encoded, "latent_dist") else encoded.latent
        if self.shift_factor is not None:
            latents = latents - self.shift_factor
        return latents * self.scaling_factor


def _model_index(root: Path) -> dict:
    """``model_index.json`` of the pipeline: its class and each part's ``[library, class]``; Stable Diffusion's
    CLIP and AutoencoderKL when there is none."""
    import json

    index_file = root / "model_index.json"
    if index_file.is_file():
        return json.loads(index_file.read_text())
    return {"tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


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


def _unigram_word_model(words: list[str], specials: list[str], unk: str, template: str):
    """A SentencePiece-style unigram model with ``specials`` first, one piece per word of ``words`` (``"▁red"``, as
    SentencePiece writes a word that follows a space) and those words' single characters as a fallback; each
    sequence is wrapped by ``template`` (``"<bos> $A"``, ``"$A </s>"``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    characters = sorted({c for word in words for c in word} | {"▁"})
    pieces = [(special, 0.0) for special in specials]
    pieces += [("▁" + word, -1.0) for word in words] + [(c, -10.0) for c in characters]
    model = Tokenizer(models.Unigram(pieces, unk_id=specials.index(unk)))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    wrapping = [token for token in template.split() if token != "$A"]
    model.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, specials.index(token)) for token in wrapping])
    return model


def _check_words(tokenizer, words: list[str]) -> None:
    for word in words:
        if tokenizer.tokenize(word) != ["▁" + word]:
            raise RuntimeError(f"caption word {word!r} tokenizes as {tokenizer.tokenize(word)}")


def t5_word_tokenizer(words: list[str], model_max_length: int = 512) -> object:
    """A T5 tokenizer built with no downloaded files: T5's ``<pad>``, ``</s>``, ``<unk>`` and one unigram piece per
    word of ``words`` (each word is one token), sequences ending in ``</s>``."""
    from transformers import T5TokenizerFast

    model = _unigram_word_model(words, ["<pad>", "</s>", "<unk>"], "<unk>", "$A </s>")
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=model_max_length)
    _check_words(tokenizer, words)
    return tokenizer


def gemma_word_tokenizer(words: list[str], model_max_length: int = 512) -> object:
    """A tokenizer in the form of Gemma's (Sana's text encoder) built with no downloaded files: Gemma's ``<pad>``,
    ``<eos>``, ``<bos>``, ``<unk>`` and one unigram piece per word of ``words``, sequences starting with
    ``<bos>``. It is a generic ``PreTrainedTokenizerFast``: ``GemmaTokenizerFast`` rebuilds Gemma's own BPE model
    when loaded, which this vocabulary is not."""
    from transformers import PreTrainedTokenizerFast

    model = _unigram_word_model(words, ["<pad>", "<eos>", "<bos>", "<unk>"], "<unk>", "<bos> $A")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<bos>", eos_token="<eos>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=model_max_length)
    _check_words(tokenizer, words)
    return tokenizer
