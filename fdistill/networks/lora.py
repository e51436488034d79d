"""LoRA networks (``student.lora``): the teacher's frozen weights plus trainable low-rank adapters (peft).

:func:`add_lora` freezes a diffusers denoiser (a UNet or a transformer) and gives the configured layers adapters
with peft's ``inject_adapter_in_model``; the adapters' output starts at zero (peft's default), so the network
starts as the teacher. The student file of a LoRA student holds only the adapter weights
(:func:`student_file_weights`): the run rebuilds the frozen rest from the teacher. :func:`merged_network` folds
the adapters into the base weights, for an export that stock diffusers samples.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fdistill.config import LoraConfig
from fdistill.errors import ConfigError

ADAPTER_MARK = ".lora_"  # in the names of adapter weights: ``...conv1.lora_A.default.weight``


def is_adapter_weight(name: str) -> bool:
    """Whether the parameter or state-dict entry ``name`` is a LoRA adapter's weight."""
    return ADAPTER_MARK in name


def add_lora(net: nn.Module, lora: LoraConfig, role: str = "student") -> nn.Module:
    """Freeze ``net`` (a denoiser around a diffusers UNet or transformer) and add LoRA adapters to the diffusers
    model's ``lora.target_modules``; only the adapters then require gradients. ``role`` names the network in
    errors."""
    import peft

    model = getattr(net, "network", None)
    if model is None:
        raise ConfigError(f"student.lora adapts a diffusers UNet or transformer, and this {role} is a "
                          f"{type(net).__name__}; remove student.lora or use a diffusers teacher")
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.rank if lora.alpha is None else lora.alpha,
                             target_modules=list(lora.target_modules))
    net.requires_grad_(False)
    try:
        peft.inject_adapter_in_model(config, model)
    except ValueError as e:  # peft: no layer matches target_modules
        raise ConfigError(f"student.lora.target_modules={list(lora.target_modules)}: {str(e).splitlines()[0]}; "
                          f"name layers of the teacher's {type(model).__name__}") from None
    for name, p in net.named_parameters():
        p.requires_grad_(is_adapter_weight(name))
    return net


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return any(is_adapter_weight(name) for name, _ in model.named_parameters())


def student_file_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a student's state dict that its file holds: the adapter weights alone for a LoRA student
    (its other weights are the teacher's), else all of them."""
    adapters = {k: v for k, v in state.items() if is_adapter_weight(k)}
    return adapters or state


def load_student_file(student: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`student_file_weights` kept into ``student``, which must have exactly those entries, in
    the same shapes."""
    expected = {k: v.shape for k, v in student_file_weights(student.state_dict()).items()}
    differing = sorted(k for k in expected.keys() | state.keys() if k not in state or expected.get(k) != state[k].shape)
    if differing:
        raise ConfigError(f"the student file does not fit the configured student ({len(differing)} weights differ, "
                          f"e.g. {differing[0]}); was it written with another student.lora?")
    student.load_state_dict(state, strict=False)


def merged_network(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no adapters, else a copy with the adapters merged into its base weights and
    removed: a plain diffusers model that computes what the adapted one does."""
    if not has_adapters(model):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, layer in list(merged.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    del merged.peft_config  # set by peft's injection; a plain diffusers model has none
    return merged
