"""Jacobian-vector products of a network in ``(x_t, t)``, as sCM/rCM need for ``dF/dt`` (docs/objectives.md §8, §9).

Two modes, chosen by config:

* ``exact``: forward-mode AD with ``torch.func.jvp`` inside :func:`forward_ad_context`, which scopes the two
  work-arounds forward-mode AD needs on CPU to the call (the math attention kernel, contiguous GroupNorm
  inputs); nothing is patched globally.
* ``finite_difference``: the central difference ``(f(x + h dx, t + h dt) - f(x - h dx, t - h dt)) / 2h``,
  perturbations and quotient in float64, with the time step ``h dt = max(1e-3 |t|, 1e-6)`` of FastGen's sCM.
  It needs only forward passes, so it works where forward-mode AD does not (FlashAttention, FSDP).

Both evaluations of a difference, and the training forward they belong to, replay one RNG state
(:class:`ReplayRNG`) so that dropout masks match; autocast is off inside, so that the JVP runs in the
network's own precision even in a mixed-precision run (docs/objectives.md §12 item 6).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fdistill.schedules import broadcast_to

JVP_MODES = ("exact", "finite_difference")


class ReplayRNG:
    """The RNG state at construction; each ``with replay():`` block starts from it (same dropout masks)."""

    def __init__(self, device=None):
        self.device = torch.device(device if device is not None else "cpu")
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @contextmanager
    def __call__(self):
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        yield


def _contiguous_inputs(_module, args):
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


@contextmanager
def forward_ad_context(module: nn.Module | None = None):
    """Math SDPA kernel and contiguous inputs to ``module``'s GroupNorm layers, for the block's duration."""
    groupnorms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)] if module is not None else []
    handles = [m.register_forward_pre_hook(_contiguous_inputs) for m in groupnorms]
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for handle in handles:
            handle.remove()


def finite_difference_step(x, t, dx, dt, relative_step: float = 1e-3) -> torch.Tensor:
    """Per-sample step ``h`` [B] (float64): the time moves by ``max(rel |t|, 1e-6)``; along pure-``x``
    directions (``dt = 0``) ``x`` moves by ``rel`` times its RMS."""
    dt = dt.double()
    time_step = (relative_step * t.double().abs()).clamp(min=1e-6) / dt.abs().clamp(min=1e-30)
    rms = lambda v: v.double().flatten(1).pow(2).mean(1).sqrt()  # noqa: E731
    x_step = relative_step * rms(x).clamp(min=1e-6) / rms(dx).clamp(min=1e-30)
    return torch.where(dt != 0, time_step, x_step)


def time_jvp(fn: Callable, x: torch.Tensor, t: torch.Tensor, dx: torch.Tensor, dt: torch.Tensor,
             mode: str = "exact", relative_step: float = 1e-3, module: nn.Module | None = None,
             rng: ReplayRNG | None = None) -> torch.Tensor:
    """``d/de fn(x + e dx, t + e dt)`` at ``e = 0``, without gradient; ``fn(x, t)`` takes ``t`` [B] float64.

    ``module`` is the network inside ``fn`` (its GroupNorm layers get contiguous inputs in exact mode);
    ``rng`` replays the dropout masks of the caller's own forward pass (captured here when omitted).
    Returns a tensor shaped like ``fn``'s output, in its dtype (exact) or float64 (finite difference).
    """
    if mode not in JVP_MODES:
        raise ValueError(f"unknown JVP mode {mode!r}; use one of {JVP_MODES}")
    rng = rng if rng is not None else ReplayRNG(x.device)
    t, dt = t.double(), dt.double()
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # no bf16 JVP under AMP (§12 item 6)
        if mode == "exact":
            with forward_ad_context(module), rng():
                return torch.func.jvp(fn, (x, t), (dx.to(x.dtype), dt))[1]
        h = finite_difference_step(x, t, dx, dt, relative_step)
        shift = broadcast_to(h, x) * dx.double()
        with rng():
            plus = fn((x.double() + shift).to(x.dtype), t + h * dt).double()
        with rng():
            minus = fn((x.double() - shift).to(x.dtype), t - h * dt).double()
        return (plus - minus) / (2 * broadcast_to(h, plus))
