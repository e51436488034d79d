"""Checkpoints: atomic directories written through accelerate's ``save_state``, pruned only after a commit.

``RUN_DIR/checkpoints/step-00000100/`` holds what accelerate saves (the RNG states of every process, the fp16
loss scaler) and ``custom_checkpoint_0.pkl``, the trainer's state: full (unsharded) weights of every trained
network and of the objective, optimizers, LR schedules, EMAs, step and fault counters. A checkpoint is written
into ``.tmp-step-...`` and renamed once every process has finished writing, so a crash in the middle leaves
the earlier checkpoints intact; the next write removes stale temporary directories. Weights are gathered
whole (also under FSDP), so a checkpoint can be resumed with any number of processes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from fdistill.errors import ConfigError

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
STATE_FILE = "custom_checkpoint_0.pkl"  # accelerate's name for the first registered object (the trainer)


class NonFiniteState(RuntimeError):
    """A checkpoint was about to hold a NaN/inf weight or optimizer moment; it is not written."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob(PREFIX + "*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def unreadable(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (its trainer state does not load), or ``None``."""
    try:
        torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated pickles, missing files and bad zips raise many types
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else "unreadable"  # torch's messages run long
        return f"{type(e).__name__}: {first}"
    return None


def resolve(run_dir: str | Path, resume: str, note=print) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` (the newest readable one, after a ``note`` for each newer
    one skipped; ``None`` after a note when the run has none) or one checkpoint, a directory or a name, which
    must be readable."""
    if resume == "latest":
        found = checkpoint_dirs(run_dir)
        if not found:
            note(f"no checkpoint in {Path(run_dir) / CHECKPOINTS}: starting from step 0")
            return None
        for path in reversed(found):
            problem = unreadable(path)
            if problem is None:
                return path
            note(f"skipping unreadable checkpoint {path} ({problem})")
        raise ConfigError(f"no checkpoint of {run_dir} is readable (the newest: {found[-1].name}); resume from "
                          "another checkpoint directory with --resume-from DIR, or start again with --overwrite")
    path = find(run_dir, resume)  # a directory, or a checkpoint's name in the run
    problem = unreadable(path)
    if problem is not None:
        raise ConfigError(f"--resume-from {resume}: unreadable checkpoint ({problem}); give another one")
    return path


def _short_write(error: RuntimeError) -> bool:
    """Whether ``error`` is PyTorch's zip writer failing to write (a full disk), which it reports from its C++
    stream as a ``RuntimeError`` rather than an ``OSError``."""
    return any(mark in str(error) for mark in ("PytorchStreamWriter failed", "inline_container.cc"))


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the earlier checkpoints are intact."""


def save(accelerator, run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically on all processes, then keep only the ``keep_last`` newest."""
    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / f"{PREFIX}{step:08d}", root / f".tmp-{PREFIX}{step:08d}"
    accelerator.wait_for_everyone()
    if final.is_dir():  # the state after a given step is deterministic: nothing new to write
        return final
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_tree(tmp)
            os.replace(tmp, final)
            _fsync_dir(root)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _short_write(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoint_dirs(run_dir)
        intact = f"checkpoint {kept[-1].name} is intact" if kept else "no earlier checkpoint was touched"
        reason = (e.strerror or e) if isinstance(e, OSError) else "PyTorch could not finish writing a file; is the "\
            "disk full?"
        raise CheckpointWriteError(f"could not write checkpoint {final.name} ({reason}); {intact}; free "
                                   "space and continue with --resume") from None
    if accelerator.is_main_process:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: str | Path) -> None:
    accelerator.load_state(str(path))


def find(run_dir: str | Path, checkpoint: str) -> Path:
    """The checkpoint directory named by ``checkpoint``: ``latest``, a name such as ``step-00001000``, or a path."""
    run_dir = Path(run_dir)
    if checkpoint == "latest":
        found = checkpoint_dirs(run_dir)
        if not found:
            raise ConfigError(f"{run_dir} has no checkpoints yet")
        return found[-1]
    path = Path(checkpoint)
    if not path.is_dir() and (run_dir / CHECKPOINTS / checkpoint).is_dir():
        path = run_dir / CHECKPOINTS / checkpoint
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"checkpoint {checkpoint}: not a checkpoint directory (no {STATE_FILE}); give "
                          f"latest, a name in {run_dir / CHECKPOINTS} or a directory")
    return path


def load_student(path: Path, student: torch.nn.Module, ema: str | None = None) -> int:
    """Load the student's weights (or one of its EMAs) from checkpoint ``path``; returns the checkpoint's step.

    The trainer's state holds the whole student state dict and, per EMA, float32 shadows of its trained
    parameters; an EMA is loaded as ``EMASet.module_state_dict`` builds it.
    """
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)  # plain tensors and numbers
    student.load_state_dict(state["modules"]["student"])
    if ema is not None:
        if ema not in state["ema"]:
            raise ConfigError(f"{path} holds no EMA {ema!r}; it has {sorted(state['ema']) or 'none'}")
        params = dict(student.named_parameters())
        with torch.no_grad():
            for name, average in state["ema"][ema]["shadow"].items():
                params[name].copy_(average)
    return int(state["counters"]["step"])


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def full_tensor(t: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """The whole tensor on the CPU; gathers FSDP shards (a collective: call on every process). ``copy=False`` may
    return ``t`` itself (for state that is written out at once: a checkpoint holds no second copy of the run)."""
    if isinstance(t, DTensor):
        return t.full_tensor().detach().cpu()
    whole = t.detach().cpu()
    return whole.clone() if copy and t.device.type == "cpu" else whole


@torch.no_grad()
def load_full_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a whole tensor into ``dst``, keeping only this process's shard when ``dst`` is sharded."""
    if isinstance(dst, DTensor):
        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(src.to_local())
    else:
        dst.copy_(src)


def full_state_dict(module: torch.nn.Module, copy: bool = True) -> dict:
    return {k: full_tensor(v, copy) for k, v in module.state_dict().items()}


def load_full_state_dict(module: torch.nn.Module, state: dict) -> None:
    own = module.state_dict(keep_vars=True)
    if own.keys() != state.keys():
        mismatch = sorted(own.keys() ^ state.keys())
        raise KeyError(f"checkpoint does not match {type(module).__name__}: {mismatch}")
    for k, v in own.items():
        load_full_(v, state[k])


def full_optimizer_state(opt: torch.optim.Optimizer, copy: bool = True) -> dict:
    state = opt.state_dict()
    state["state"] = {i: {k: full_tensor(v, copy) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def load_full_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole optimizer state, re-sharding each moment like its parameter."""
    params = [p for group in opt.param_groups for p in group["params"]]
    sharded = {}
    for i, s in state["state"].items():
        p = params[i]
        sharded[i] = {k: _like_param(v, p) for k, v in s.items()}
    opt.load_state_dict({**state, "state": sharded})


def _like_param(value, param: torch.Tensor):
    if not (torch.is_tensor(value) and isinstance(param, DTensor) and value.shape == param.shape):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def assert_finite(tree, where: str = "state") -> None:
    """Raise :class:`NonFiniteState` naming the first NaN/inf floating-point tensor in a nested state."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            assert_finite(v, f"{where}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            assert_finite(v, f"{where}[{i}]")
    elif torch.is_tensor(tree) and tree.is_floating_point() and not torch.isfinite(tree).all():
        raise NonFiniteState(f"{where} holds NaN/inf values; the checkpoint was not written")
