"""LoRA networks on one frozen base (``student.lora``, ``fake_score.lora``).

Every LoRA network of a run adapts the teacher's own diffusers model, which holds the frozen weights once:
:class:`SharedBase` injects one named adapter per LoRA network into it (peft's ``inject_adapter_in_model``) and
switches which adapter a call runs with. Outside :meth:`SharedBase.active` no adapter is active, so the teacher
(and its guided passes) is the base itself. :class:`AdapterDenoiser` is one adapter read as a denoiser: it runs
the base's denoiser with its adapter active, and its parameters, state dict, optimizer state and EMAs are that
adapter's weights alone. Adapters start with a zero output (peft's default), so a LoRA network starts as the
teacher.

Activation checkpointing recomputes a block's forward pass during the backward pass, when another adapter (or
none) may be active; :meth:`SharedBase.checkpoint` is the checkpointing function the base's blocks use, which
recomputes with the adapter that was active when the block first ran.

The student file of a LoRA student holds only its adapter weights (:func:`student_file_weights`): the run
rebuilds the frozen rest from the teacher. :func:`merged_network` folds one adapter into the base weights, for an
export that stock diffusers samples.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fdistill.config import LoraConfig
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import Denoiser

ADAPTER_MARK = ".lora_"  # in the names of adapter weights: ``...conv1.lora_A.weight``
STUDENT_ADAPTER, FAKE_SCORE_ADAPTER = "student", "fake_score"


def is_adapter_weight(name: str) -> bool:
    """Whether the parameter or state-dict entry ``name`` is a LoRA adapter's weight."""
    return ADAPTER_MARK in name


def _tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


class SharedBase:
    """The teacher's frozen diffusers model (inside ``denoiser``, the teacher's adapter) with named LoRA adapters,
    at most one of them active at a time: none outside :meth:`active`."""

    def __init__(self, denoiser: Denoiser, section: str):
        self.model = getattr(denoiser, "network", None)
        if self.model is None:
            raise ConfigError(f"{section} adapts a diffusers UNet or transformer, and this teacher is a "
                              f"{type(denoiser).__name__}; remove {section} or use a diffusers teacher")
        self.denoiser, self.current = denoiser, None
        self.layers: dict[str, nn.Module] = {}

    def add(self, name: str, lora: LoraConfig, section: str) -> None:
        """Inject adapter ``name`` into the configured layers (``lora.target_modules``), in float32 whatever the
        base's dtype; the base stays frozen and no adapter is active."""
        import peft

        config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.rank if lora.alpha is None else lora.alpha,
                                 target_modules=list(lora.target_modules))
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the design
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                peft.inject_adapter_in_model(config, self.model, adapter_name=name)
        except ValueError as e:  # peft: no layer matches target_modules
            raise ConfigError(f"{section}.target_modules={list(lora.target_modules)}: {str(e).splitlines()[0]}; "
                              f"name layers of the teacher's {type(self.model).__name__}") from None
        self.layers = _tuner_layers(self.model)
        for module in self.adapter_modules(name).values():
            module.float().requires_grad_(True)
        self._activate(self.current)

    def adapter_modules(self, name: str) -> dict[str, nn.Module]:
        """Adapter ``name``'s own modules by their path in the model (``<layer>.lora_A``, ``<layer>.lora_B``)."""
        return {f"{path}.{kind}": getattr(layer, kind)[name] for path, layer in self.layers.items()
                for kind in ("lora_A", "lora_B") if name in getattr(layer, kind)}

    def _activate(self, name: str | None) -> None:
        # peft's own switches (set_adapter, enable_adapters) also change requires_grad, which the trainer owns;
        # these are the two attributes its LoRA layers read in forward.
        for layer in self.layers.values():
            layer._active_adapter = [name] if name is not None else []
            layer._disable_adapters = name is None
        self.current = name

    @contextmanager
    def active(self, name: str | None):
        """Run the model with adapter ``name`` (``None``: the base alone), then restore the previous state."""
        previous = self.current
        if name == previous:
            yield
            return
        self._activate(name)
        try:
            yield
        finally:
            self._activate(previous)

    def checkpoint(self, block, *args):
        """diffusers' gradient-checkpointing function for the base's blocks: ``block(*args)`` without keeping its
        activations, recomputed in the backward pass with the adapter active now."""
        adapter = self.current

        def run(*inputs):
            with self.active(adapter):
                return block(*inputs)

        return checkpoint(run, *args, use_reentrant=False)


def _module_tree(modules: dict[str, nn.Module]) -> nn.Module:
    """A module holding ``modules`` at their dotted paths (the same module objects, not copies)."""
    root = nn.Module()
    for path, module in modules.items():
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(leaf, module)
    return root


class AdapterDenoiser(Denoiser):
    """The shared base's denoiser with adapter ``adapter`` active: a LoRA student's or fake score's network. Its
    parameters are the adapter's weights alone (``weights``, by their paths in the model); the frozen base belongs
    to the teacher."""

    def __init__(self, base: SharedBase, adapter: str):
        super().__init__()
        self.base, self.adapter = base, adapter  # a plain object: the base's weights are not this module's
        self.weights = _module_tree(base.adapter_modules(adapter))
        inner = base.denoiser
        self.schedule, self.sample_shape = inner.schedule, inner.sample_shape
        self.prediction_type = inner.prediction_type
        self.num_class_embeds, self.conditional = inner.num_class_embeds, inner.conditional
        self.text_conditioned = getattr(inner, "text_conditioned", False)

    @property
    def network(self) -> nn.Module:
        """The shared diffusers model (every adapter in it; :func:`merged_network` keeps this one's)."""
        return self.base.model

    def forward_with_features(self, x_t, t, cond=None):
        with self.base.active(self.adapter):
            return self.base.denoiser.forward_with_features(x_t, t, cond)

    def features(self, x_t, t, cond=None):
        with self.base.active(self.adapter):
            return self.base.denoiser.features(x_t, t, cond)

    def network_output(self, x_t, t, cond=None):
        with self.base.active(self.adapter):
            return self.base.denoiser.network_output(x_t, t, cond)

    def stock_sampling(self):
        return self.base.denoiser.stock_sampling()

    def pipeline_call_arguments(self) -> dict:
        return self.base.denoiser.pipeline_call_arguments()

    def null_condition(self, cond):
        return self.base.denoiser.null_condition(cond)


def lora_network(base: SharedBase, adapter: str, lora: LoraConfig, section: str) -> AdapterDenoiser:
    """A new adapter ``adapter`` on ``base``, as a trainable denoiser."""
    base.add(adapter, lora, section)
    return AdapterDenoiser(base, adapter).train()


def has_adapters(net: Denoiser) -> bool:
    """Whether the denoiser ``net`` is a LoRA network."""
    return net.adapter is not None


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


def merged_network(net: Denoiser, in_place: bool = False) -> nn.Module:
    """The diffusers model of the denoiser ``net`` as plain diffusers: for a LoRA network, a copy of the base with
    its adapter merged into the base weights and every adapter removed; else ``net.network`` itself. ``in_place``
    merges into the shared base itself instead of a copy, so no second base is held (a 12B base is 24 GB in
    bfloat16); the base then carries the adapter in its weights and no adapter, and the run's networks are done."""
    if not has_adapters(net):
        return net.network
    merged = net.network if in_place else copy.deepcopy(net.network)
    for name, layer in _tuner_layers(merged).items():
        if net.adapter in layer.lora_A:
            layer.merge(adapter_names=[net.adapter])
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    del merged.peft_config  # set by peft's injection; a plain diffusers model has none
    return merged


def adapter_state_dict(net: AdapterDenoiser) -> dict[str, torch.Tensor]:
    """The LoRA network's adapter weights under peft's names (``<layer>.lora_A.weight``), as diffusers' LoRA
    files store them."""
    return {key: value.detach() for key, value in net.weights.state_dict().items()}


def adapter_config(net: AdapterDenoiser):
    """The peft ``LoraConfig`` of the LoRA network's adapter."""
    return net.network.peft_config[net.adapter]
