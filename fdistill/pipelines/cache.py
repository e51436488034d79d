"""What the frozen text encoders and VAE compute, kept on disk (``data.cache_dir``), so that a second run, or the
same run resumed, skips them.

* **Prompt embeddings** live under ``<cache_dir>/embeddings/<encoder digest>/`` as safetensors shards; each entry
  is one prompt's condition tensor (the hidden states with the pooled embedding or the attention mask packed in,
  as :meth:`~fdistill.pipelines.parts.LatentPipelineParts.embed` returns it), named by the SHA-256 of the prompt
  text. The digest (:func:`weights_digest`) covers every tokenizer's vocabulary and every text encoder's weights
  (names, dtypes, shapes and bytes) and the encoding settings, so a different encoder, dtype or prompt length
  never reads another's embeddings: it writes its own beside them, with a one-line note.
* **Latents** of a set of real images live under ``<cache_dir>/latents/<digest>/``, the digest covering the VAE's
  weights and whatever identifies the images and their posterior draws (the files' bytes, the size, the seed);
  shards are written in order and a ``complete.json`` last, so an interrupted write is redone, never half read.

Each shard is written to a temporary name and renamed, so concurrent processes (several GPUs of one run) write
whole files or none, and a reader never sees a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fdistill.errors import ConfigError

SHARD_BYTES = 256 * 2**20  # a shard holds about this much


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def weights_digest(modules: list, settings: dict) -> str:
    """A digest of ``settings`` (JSON-serialisable) and of ``modules``: each ``torch.nn.Module``'s state dict
    (entry names, dtypes, shapes and bytes) and each tokenizer's class, vocabulary and maximum length."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for module in modules:
        digest.update(type(module).__name__.encode())
        if isinstance(module, torch.nn.Module):
            for name, tensor in module.state_dict().items():
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
        else:  # a tokenizer
            digest.update(json.dumps(sorted(module.get_vocab().items())).encode())
            digest.update(str(module.model_max_length).encode())
    return digest.hexdigest()[:20]


def _write_shard(directory: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path = directory / name
    temporary = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata)
    os.replace(temporary, path)
    return path


class EmbeddingCache:
    """The prompt embeddings of one text encoder (``digest``) under ``root``: :meth:`get` the cached ones,
    :meth:`put` new ones (a new shard)."""

    def __init__(self, root: Path, digest: str, description: dict):
        embeddings = Path(root) / "embeddings"
        self.directory = embeddings / digest
        others = [p for p in embeddings.iterdir() if p.is_dir() and p.name != digest] if embeddings.is_dir() else []
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "encoder.json").write_text(json.dumps(description, indent=1, default=str) + "\n")
        except OSError as e:
            raise ConfigError(f"data.cache_dir={root}: cannot write there ({e.strerror}); choose a writable "
                              "directory") from None
        self.index: dict[str, Path] = {}  # entry name -> its shard
        for shard in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                self.index.update(dict.fromkeys(f.keys(), shard))
        if not self.index and any(any(p.glob("*.safetensors")) for p in others):
            print(f"data.cache_dir: the prompt embeddings in {root} were made by another text encoder; encoding "
                  f"them again for this one, into {self.directory}")

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The cached entries among ``names``, read from their shards."""
        by_shard = defaultdict(list)
        for name in names:
            if name in self.index:
                by_shard[self.index[name]].append(name)
        found = {}
        for shard, entries in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                found.update({name: f.get_tensor(name) for name in entries})
        return found

    def put(self, entries: dict[str, torch.Tensor], texts: dict[str, str]) -> None:
        """Write ``entries`` (name -> tensor) as new shards; ``texts`` (name -> prompt) goes into their metadata."""
        batch, size = {}, 0
        for name, tensor in entries.items():
            batch[name] = tensor
            size += tensor.numel() * tensor.element_size()
            if size >= SHARD_BYTES:
                self._write(batch, texts)
                batch, size = {}, 0
        if batch:
            self._write(batch, texts)

    def _write(self, batch: dict[str, torch.Tensor], texts: dict[str, str]) -> None:
        metadata = {"prompts": json.dumps({name: texts[name] for name in batch})}
        shard = _write_shard(self.directory, f"shard-{uuid.uuid4().hex[:12]}.safetensors", batch, metadata)
        self.index.update(dict.fromkeys(batch, shard))


class LatentCache:
    """The latents of one image set under one VAE (``digest``) under ``root``."""

    def __init__(self, root: Path, digest: str):
        self.directory = Path(root) / "latents" / digest

    def load(self) -> torch.Tensor | None:
        """The cached latents, or ``None`` unless a complete set was written."""
        complete = self.directory / "complete.json"
        if not complete.is_file():
            return None
        shards = json.loads(complete.read_text())["shards"]
        chunks = []
        for shard in shards:
            with safe_open(str(self.directory / shard), "pt") as f:
                chunks.append(f.get_tensor("latents"))
        return torch.cat(chunks)

    def save(self, latents: torch.Tensor, description: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        per_shard = max(1, SHARD_BYTES // max(1, latents[:1].numel() * latents.element_size()))
        shards = [_write_shard(self.directory, f"shard-{k:05d}.safetensors", {"latents": chunk}, {}).name
                  for k, chunk in enumerate(latents.split(per_shard))]
        (self.directory / "complete.json").write_text(
            json.dumps({"shards": shards, **description}, indent=1, default=str) + "\n")
