"""Exponential moving averages of the student's weights, several at once.

Three kinds, one per :class:`~fdistill.config.EMASpec`:

* constant decay ``beta`` per update (FastGen, DMD2);
* EDM half-life (Karras et al. 2022, arXiv 2206.00364, training loop): ``beta = 0.5 ** (B / N_half)`` with
  ``N_half = half_life_kimg * 1000`` samples, ramped up as ``min(N_half, rampup * samples so far)``;
* EDM2 power function (Karras et al. 2024, arXiv 2312.02696, eq. 3-4): ``beta_t = (1 - 1/t) ** (gamma + 1)``
  at update ``t``, with ``gamma`` set by the relative standard deviation ``sigma_rel`` (eq. 5).

Averages cover the parameters that train (a LoRA student's adapters alone) and live in float32 beside the
weights they follow (sharded like them under FSDP). The trainer updates them after student updates
(``ema.update: generator``) or after every step (``every``); evaluation and previews swap one in with
:meth:`EMASet.swapped`.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fdistill.config import EMASpec
from fdistill.training.checkpoint import full_tensor, load_full_


def power_exponent(sigma_rel: float) -> float:
    """EDM2 eq. 5 solved for gamma: ``sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3))``, the largest real root."""
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


class EMA:
    """One average: float32 copies of the followed parameters and the number of updates so far."""

    def __init__(self, spec: EMASpec, params: dict[str, torch.Tensor], batch_size: int):
        self.spec, self.batch_size, self.updates = spec, batch_size, 0
        self.gamma = power_exponent(spec.sigma_rel) if spec.sigma_rel is not None else None
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    def beta(self) -> float:
        """Decay of update number ``self.updates`` (1-based)."""
        spec = self.spec
        if spec.decay is not None:
            return spec.decay
        if self.gamma is not None:
            return (1 - 1 / self.updates) ** (self.gamma + 1)
        half_life = spec.half_life_kimg * 1000
        if spec.rampup is not None:
            half_life = min(half_life, spec.rampup * self.updates * self.batch_size)
        return 0.5 ** (self.batch_size / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        self.updates += 1
        weight = 1 - self.beta()
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), weight)


class EMASet:
    """Named averages of the parameters of one module that train (those requiring gradients when it is built: a
    LoRA student's adapters; the frozen rest never changes)."""

    def __init__(self, module: nn.Module, specs: list[EMASpec], batch_size: int):
        self.module = module
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.averages = {s.name: EMA(s, self.params, batch_size) for s in specs}

    def update(self) -> None:
        for ema in self.averages.values():
            ema.update(self.params)

    @contextmanager
    def swapped(self, name: str | None):
        """Temporarily load average ``name`` into the module (``None``: leave the trained weights)."""
        if name is None:
            yield self.module
            return
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        self._copy_into_params(self.averages[name].shadow)
        try:
            yield self.module
        finally:
            self._copy_into_params(backup)

    @torch.no_grad()
    def _copy_into_params(self, values: dict[str, torch.Tensor]) -> None:
        for k, p in self.params.items():
            p.copy_(values[k])

    def module_state_dict(self, name: str) -> dict:
        """The module's whole state dict with average ``name`` in place of its parameters (collective), made
        without touching the module: its entries may be the average's and the module's own tensors."""
        shadow = self.averages[name].shadow
        return {k: full_tensor(shadow[k] if k in shadow else v, copy=False)
                for k, v in self.module.state_dict().items()}

    def state_dict(self, copy: bool = True) -> dict:
        return {name: {"updates": ema.updates, "shadow": {k: full_tensor(v, copy) for k, v in ema.shadow.items()}}
                for name, ema in self.averages.items()}

    def load_state_dict(self, state: dict) -> None:
        if state.keys() != self.averages.keys():
            raise KeyError(f"checkpoint holds EMAs {sorted(state)}; the config has {sorted(self.averages)}")
        for name, ema in self.averages.items():
            ema.updates = state[name]["updates"]
            for k, v in ema.shadow.items():
                load_full_(v, state[name]["shadow"][k])
