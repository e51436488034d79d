"""The memory pre-flight: a run's peak memory per process, estimated by component before any weight loads, and a
one-line refusal, naming the levers that would make it fit, when the device cannot hold it.

Nothing is loaded to estimate. The teacher's pipeline is built from its configs on the meta device, where tensors
have shapes and no storage: that gives each network's exact parameter count and the size of the configured LoRA
adapters (injected as the run injects them). One pass of each kind of network on meta tensors, under
:func:`torch.autograd.graph.saved_tensors_hooks`, measures the activations autograd keeps for the backward pass at
the run's device batch: a full trainable copy, a LoRA network on the frozen base, the frozen teacher with its
input gradient. With ``train.gradient_checkpointing`` a checkpointed block keeps only its inputs, and its own
activations come back for one block at a time during the backward pass. The objective says which passes a step
keeps (:meth:`fdistill.objectives.base.Objective.kept_passes`).

Components: the frozen weights (teacher or shared base, in ``teacher.dtype``), the text encoders (also in it) and
the VAE (always float32), the
trained weights in float32, their gradients (one step kind's at a time: the trainer frees the others), AdamW's two
moments, the EMAs, the cached prompt embeddings and real latents, the activations, and the process itself (on a CPU
its resident memory now, with Python and the libraries loaded). The run's peak is the larger of loading (a teacher
that full copies start from loads in float32) and training.
"""

from __future__ import annotations

import os
import resource
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fdistill.config import Config, batch_layout
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import Denoiser, freeze
from fdistill.networks.lora import FAKE_SCORE_ADAPTER, STUDENT_ADAPTER, SharedBase, lora_network
from fdistill.objectives import OBJECTIVES, build_objective
from fdistill.pipelines.loading import load_diffusers_teacher
from fdistill.pipelines.parts import LatentPipelineParts
from fdistill.tasks import check_inputs
from fdistill.teachers import frozen_dtype, prompt_length, teacher_directory, unet_teacher

GIB = 1024**3
ADAMW_MOMENTS = 2
FLOAT32 = 4


@dataclass
class MemoryEstimate:
    """Estimated bytes per process by component, with a short account of each."""

    rows: dict[str, tuple[float, str]] = field(default_factory=dict)
    loading: float = 0.0  # the peak while loading, before training starts
    # rows never resident together (the encoders visit an accelerator between steps, when no activations are kept)
    exclusive: tuple[str, ...] = ()
    host: tuple[str, ...] = ()  # rows held in CPU memory while the device is an accelerator: shown, not counted

    def add(self, component: str, size: float, account: str) -> None:
        self.rows[component] = (float(size), account)

    @property
    def training(self) -> float:
        together = sum(size for name, (size, _) in self.rows.items() if name not in self.exclusive + self.host)
        return together + max((self.rows[name][0] for name in self.exclusive), default=0.0)

    @property
    def total(self) -> float:
        return max(self.training, self.loading)

    def table(self) -> str:
        lines = ["memory pre-flight, estimated peak per process:"]
        lines += [f"  {name:<22} {size / GIB:8.2f} GiB  {account}" for name, (size, account) in self.rows.items()]
        apart = f"; {' and '.join(self.exclusive)} never at once" if self.exclusive else ""
        apart += f"; {', '.join(self.host)} in CPU memory" if self.host else ""
        lines.append(f"  {'peak':<22} {self.total / GIB:8.2f} GiB  "
                     f"(training {self.training / GIB:.2f}, loading {self.loading / GIB:.2f}{apart})")
        return "\n".join(lines)


def parameter_count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def weight_count(module: torch.nn.Module) -> int:
    """Parameters and buffers (SD3's position table is a buffer): what a frozen network holds."""
    return parameter_count(module) + sum(b.numel() for b in module.buffers())


# ------------------------------------------------------------------------------------------------- meta probes
class ActivationMeter:
    """Bytes of the tensors autograd saves for the backward pass (parameters excluded, each tensor once); with
    activation checkpointing, a checkpointed block's inputs count, and its own saved tensors only as the largest
    block's (recomputed one block at a time)."""

    def __init__(self, parameters):
        self.parameters = {id(p) for p in parameters}
        self.seen: set[int] = set()
        self.kept = self.block = self.largest_block = 0
        self.in_block = False

    def pack(self, tensor):
        key = id(tensor._base if tensor._base is not None else tensor)
        if id(tensor) not in self.parameters and key not in self.seen:
            self.seen.add(key)
            size = tensor.numel() * tensor.element_size()
            if self.in_block:
                self.block += size
            else:
                self.kept += size
        return tensor

    def checkpointed(self, block, *args):
        """Stands in for diffusers' checkpointing function on the meta model."""
        self.kept += sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))
        self.in_block, self.block = True, 0
        try:
            return block(*args)
        finally:
            self.in_block, self.largest_block = False, max(self.largest_block, self.block)

    @property
    def total(self) -> int:
        return self.kept + self.largest_block


class _FusedAttention(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` on meta tensors, where PyTorch would pick the math kernel and
    keep the ``L x L`` attention matrix: the output and the tensors a fused (flash) kernel saves, the query, key,
    value, output and per-row log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


def _fused_attention(query, key, value, *args, **kwargs):
    if query.device.type != "meta":
        return _sdpa(query, key, value, *args, **kwargs)
    return _FusedAttention.apply(query, key, value)


_sdpa = torch.nn.functional.scaled_dot_product_attention


def kept_activations(net: Denoiser, model: torch.nn.Module, x, t, cond, checkpointing: bool,
                     input_gradient: bool) -> int:
    """Bytes one training pass of ``net`` (around the meta ``model``) keeps for the backward pass, attention
    counted as a fused kernel keeps it."""
    meter = ActivationMeter(model.parameters())
    if checkpointing:
        model.enable_gradient_checkpointing(meter.checkpointed)
    x = x.detach().requires_grad_(input_gradient)
    torch.nn.functional.scaled_dot_product_attention = _fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda tensor: tensor):
            net.network_output(x, t, cond)
    finally:
        torch.nn.functional.scaled_dot_product_attention = _sdpa
        if checkpointing:
            model.disable_gradient_checkpointing()
    return meter.total


@dataclass
class MetaPipeline:
    """The teacher's pipeline built on the meta device: its denoiser, its text encoders and VAE, a condition probe
    and the sizes of the weight files that loading reads."""

    teacher: Denoiser
    text_encoders: list[torch.nn.Module] = field(default_factory=list)
    vae: torch.nn.Module | None = None
    probe_condition: torch.Tensor | None = None  # one prompt's condition (meta), or None without text
    denoiser_file_bytes: int = 0  # the denoiser's weight files, read (memory-mapped) while it loads
    parts_file_bytes: int = 0  # the text encoders' and the VAE's


def meta_pipeline(cfg: Config) -> MetaPipeline | None:
    """The run's teacher built on the meta device, or ``None`` for a teacher with no diffusers network (the analytic
    ones, whose memory is negligible)."""
    tc = cfg.teacher
    if tc.kind == "unet":
        from accelerate import init_empty_weights

        with init_empty_weights():
            return MetaPipeline(unet_teacher(cfg))
    located = teacher_directory(cfg)
    if located is None:
        return None
    root, source = located
    options = (tc.prediction_type, tc.resolution, tc.embedded_guidance) if tc.kind == "pretrained" else \
        (tc.prediction_type, None, None)
    teacher = load_diffusers_teacher(root, *options, on_meta=True,
                                     num_frames=tc.num_frames if tc.kind == "pretrained" else None)
    root = Path(root)
    denoiser_dir = next((root / name for name in ("unet", "transformer") if (root / name).is_dir()), root)
    denoiser_files = _weight_file_bytes(denoiser_dir)
    if not (root / "vae").is_dir():
        return MetaPipeline(teacher, denoiser_file_bytes=denoiser_files)
    parts = LatentPipelineParts.load(root, source, teacher.network, prompt_length(root, tc.max_sequence_length),
                                     on_meta=True)
    condition = None
    if parts.text:
        with torch.no_grad():
            condition = parts.encode_prompts([""])
    modules = {name: part for name, part in parts.parts.items() if isinstance(part, torch.nn.Module)}
    text_encoders = [part for name, part in modules.items() if name != "vae"]
    return MetaPipeline(teacher, text_encoders, parts.vae, condition, denoiser_files,
                        sum(_weight_file_bytes(root / name) for name in modules))


def _weight_file_bytes(directory: Path) -> int:
    """Bytes of the weight files in ``directory`` (safetensors, else PyTorch's), without a variant's duplicates."""
    for pattern in ("*.safetensors", "*.bin"):
        files = [f for f in directory.glob(pattern) if len(f.name.split(".")) == 2]  # no "model.fp16.safetensors"
        if files:
            return sum(f.stat().st_size for f in files)
    return 0


# --------------------------------------------------------------------------------------------------- estimate
def estimate_memory(cfg: Config, options, num_processes: int = 1, process_memory: float | None = None,
                    pipeline: MetaPipeline | None = None, device: str = "cpu") -> MemoryEstimate | None:
    """The run's estimated peak memory per process on a ``device`` of that type (``None`` for an analytic teacher),
    after the checks of what the configuration and the data files decide (:func:`fdistill.tasks.check_inputs`).
    ``process_memory`` is the process's own memory before loading (default: this process's resident memory). On
    an accelerator the text encoders and the VAE are there only between steps (previews) and for evaluation."""
    pipeline = pipeline or meta_pipeline(cfg)
    if pipeline is None:
        return None
    teacher = freeze(pipeline.teacher)
    try:
        objective = build_objective(options, teacher.schedule)
    except ValueError as e:
        raise ConfigError(f"objective {options.name}: {str(e).splitlines()[0]}") from None
    check_inputs(cfg, teacher, objective.needs_real_data)
    frozen = frozen_dtype(cfg)
    frozen_size = torch.finfo(frozen).bits // 8
    denoiser_params = weight_count(teacher.network)
    trainable = parameter_count(teacher.network)  # a full copy's trained weights (its buffers are not trained)
    text_params = sum(weight_count(m) for m in pipeline.text_encoders)
    vae_params = weight_count(pipeline.vae) if pipeline.vae is not None else 0
    student_lora, fake_lora = cfg.student.lora, cfg.fake_score.lora if objective.needs_fake_score else None

    base = SharedBase(teacher, "student.lora") if student_lora or fake_lora else None
    adapters = {}
    for adapter, lora, section in ((STUDENT_ADAPTER, student_lora, "student.lora"),
                                   (FAKE_SCORE_ADAPTER, fake_lora, "fake_score.lora")):
        if lora is not None:
            adapters[adapter] = lora_network(base, adapter, lora, section)
    student = parameter_count(adapters.get(STUDENT_ADAPTER)) if student_lora else trainable
    fake = 0 if not objective.needs_fake_score else \
        parameter_count(adapters.get(FAKE_SCORE_ADAPTER)) if fake_lora else trainable
    full_copies = int(student_lora is None) + int(objective.needs_fake_score and fake_lora is None)

    offloaded = device != "cpu"
    estimate = MemoryEstimate(exclusive=("text encoders, VAE", "activations") if offloaded else (),
                              host=("caches",) if offloaded else ())
    estimate.add("frozen weights", denoiser_params * frozen_size,
                 f"{_millions(denoiser_params)} {_name(frozen)} (teacher{' and shared base' if base else ''})")
    encoders = text_params * frozen_size + vae_params * FLOAT32
    estimate.add("text encoders, VAE", encoders, f"{_millions(text_params)} {_name(frozen)}, VAE "
                 f"{_millions(vae_params)} fp32" + (", on the device only between steps and for evaluation"
                                                   if offloaded else ""))
    estimate.add("trained weights", (student + fake) * FLOAT32,
                 f"student {_millions(student)}{' LoRA' if student_lora else ''}, fake score {_millions(fake)}"
                 f"{' LoRA' if fake_lora else ''}, float32")
    estimate.add("gradients", max(student, fake) * FLOAT32, "one step kind's at a time")
    moments = {"adamw": ADAMW_MOMENTS * FLOAT32, "adamw8bit": ADAMW_MOMENTS}
    estimate.add("optimizer states", student * moments[cfg.student_optim.optimizer]
                 + fake * moments[cfg.critic_optim.optimizer], "AdamW's two moments")
    if cfg.ema.averages:
        estimate.add("EMAs", len(cfg.ema.averages) * student * FLOAT32, f"{len(cfg.ema.averages)} x the student's")
    estimate.add("caches", _cache_bytes(cfg, objective, pipeline), "prompt embeddings, real latents"
                 + (", in CPU memory (a batch at a time on the device)" if offloaded else ""))

    device_batch = batch_layout(cfg.train, num_processes)[0]
    passes = _activation_bytes(cfg, objective, pipeline, base, adapters, device_batch)
    estimate.add("activations", max(passes.values()),
                 "; ".join(f"{kind} step {size / GIB:.2f} GiB" for kind, size in passes.items())
                 + f" (batch {device_batch}{', checkpointed' if cfg.train.gradient_checkpointing else ''})")
    process = _resident_memory() if process_memory is None else process_memory
    estimate.add("process", process, "Python, torch and the libraries, as now")
    # Loading reads each weight file memory-mapped (resident while its model loads), the denoiser first, then the
    # text encoders and the VAE; full copies are made from a float32 teacher before it is cast.
    loaded = denoiser_params * (frozen_size if full_copies == 0 else FLOAT32)
    estimate.loading = process + max(pipeline.denoiser_file_bytes + loaded,
                                     loaded + pipeline.parts_file_bytes + encoders,
                                     loaded * (1 + full_copies) + encoders)
    return estimate


def _activation_bytes(cfg, objective, pipeline: MetaPipeline, base, adapters, batch: int) -> dict[str, int]:
    """Activation bytes each step kind keeps, from its passes (:meth:`Objective.kept_passes`)."""
    teacher = pipeline.teacher
    x = torch.zeros(batch, *teacher.sample_shape, device="meta")
    t = torch.full((batch,), float(teacher.schedule.t_max) / 2, device="meta")
    if pipeline.probe_condition is not None:
        cond = pipeline.probe_condition.expand(batch, *pipeline.probe_condition.shape[1:])
    else:  # a class-conditional network's labels, or none
        cond = torch.zeros(batch, dtype=torch.long, device="meta") if teacher.num_class_embeds else None
    model = teacher.network
    checkpointing = cfg.train.gradient_checkpointing
    frozen = frozen_dtype(cfg)
    if frozen != torch.float32:
        teacher.keep_weights_in(frozen)  # the meta passes compute in the frozen dtype, as the run's do
    frozen_size = torch.finfo(frozen).bits // 8
    compute_size = 2 if cfg.train.mixed_precision in ("bf16", "fp16") else FLOAT32

    def network_pass(name: str) -> float:
        """One pass's kept bytes, measured in the frozen dtype and scaled to the pass's compute dtype."""
        if name == "teacher":
            size = kept_activations(teacher, model, x, t, cond, checkpointing, input_gradient=True)
            return size * min(frozen_size, compute_size) / frozen_size
        adapter = {"student": STUDENT_ADAPTER, "fake_score": FAKE_SCORE_ADAPTER}[name]
        if adapter in adapters:
            size = kept_activations(adapters[adapter], model, x, t, cond, checkpointing, input_gradient=False)
            return size * min(frozen_size, compute_size) / frozen_size
        model.requires_grad_(True)  # a full copy: every weight trains, in float32 (or the mixed precision)
        try:
            with base.active(None) if base is not None else nullcontext():
                size = kept_activations(teacher, model, x, t, cond, checkpointing, input_gradient=False)
        finally:
            model.requires_grad_(False)
            for net in adapters.values():
                net.requires_grad_(True)
        return size * compute_size / frozen_size

    measured: dict[str, int] = {}
    guided = cfg.teacher.guidance_scale != 1.0
    result = {}
    for kind in sorted({objective.step_kind(step) for step in range(min(cfg.train.steps, 16))}):
        total = 0
        for name in objective.kept_passes(kind):
            if name not in measured:
                measured[name] = network_pass(name)
            total += measured[name] * (2 if name == "teacher" and guided else 1)
        result[kind] = total
    return result


def _cache_bytes(cfg: Config, objective, pipeline: MetaPipeline) -> int:
    """The prompt embeddings of the training prompts and the latents of the real images, held in memory."""
    from fdistill.tasks.text_to_image import real_image_count, training_prompts

    if pipeline.probe_condition is None:
        return 0
    conditions = len(training_prompts(cfg)) * pipeline.probe_condition[0].numel() * FLOAT32
    if not objective.needs_real_data:
        return conditions
    return conditions + real_image_count(cfg) * torch.Size(pipeline.teacher.sample_shape).numel() * FLOAT32


def _resident_memory() -> float:
    """This process's resident memory in bytes (Linux), else 0."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def available_memory(device: torch.device) -> tuple[float, str]:
    """Bytes this process may still take on ``device``, and what limits it: the card's free memory on CUDA; on a
    CPU the available RAM, a cgroup's memory limit or the address-space limit (``ulimit -v``), the smallest."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free memory of {torch.cuda.get_device_name(device)}"
    limits = []
    meminfo = _read_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        limits.append((meminfo["MemAvailable"] * 1024, "available RAM"))
    cgroup = Path("/sys/fs/cgroup/memory.max")
    if cgroup.is_file() and cgroup.read_text().strip() != "max":
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        limits.append((int(cgroup.read_text()) - used, "the cgroup's memory limit"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _read_fields("/proc/self/status").get("VmSize", 0) * 1024
        limits.append((soft - used, "the address-space limit (ulimit -v)"))
    return min(limits) if limits else (float("inf"), "no known limit")


def _read_fields(path: str) -> dict[str, int]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if value.split() and value.split()[0].isdigit():
            fields[key] = int(value.split()[0])
    return fields


LEVERS = ("student.lora", "fake_score.lora", "teacher.dtype=bf16", "train.gradient_checkpointing=true")


def with_lever(cfg: Config, lever: str) -> Config | None:
    """``cfg`` with the memory lever ``lever`` (one of :data:`LEVERS`) applied, or ``None`` when it is already."""
    from fdistill.config import LoraConfig

    section, _, key = lever.partition("=")[0].partition(".")
    current = getattr(getattr(cfg, section), key)
    if key == "lora":
        value = LoraConfig(rank=32)
    elif key == "dtype":
        current, value = frozen_dtype(cfg) != torch.float32, "bf16"
    else:
        value = True
    return None if current else replace(cfg, **{section: replace(getattr(cfg, section), **{key: value})})


def check_device(cfg: Config, device: torch.device) -> None:
    """What the device decides before any weight loads: bitsandbytes' 8-bit AdamW runs on CUDA only."""
    for section in ("student_optim", "critic_optim"):
        if getattr(cfg, section).optimizer == "adamw8bit" and device.type != "cuda":
            raise ConfigError(f"{section}.optimizer=adamw8bit runs on a CUDA device only; use "
                              f"{section}.optimizer=adamw on this {device.type} device")


def check_fits(cfg: Config, options, estimate: MemoryEstimate, device: torch.device, num_processes: int = 1) -> None:
    """Refuse, in one line naming the levers that would make it fit, a run whose estimate exceeds what the device
    can still give this process."""
    available, limit = available_memory(device)
    current = _resident_memory() if device.type == "cpu" else 0.0
    needed = estimate.total - current
    if needed <= available:
        return
    levers, fitting = [], []
    trial = cfg
    for lever in LEVERS:
        changed = with_lever(trial, lever)
        if changed is None or (lever == "fake_score.lora" and not OBJECTIVES[options.name][0].needs_fake_score):
            continue
        trial = changed
        levers.append(lever if lever.endswith(("true", "bf16")) else f"{lever}={{rank: 32}}")
        smaller = estimate_memory(trial, options, num_processes, estimate.rows["process"][0], device=device.type)
        if smaller is not None and smaller.total - current <= available:
            fitting = list(levers)
            break
    advice = (f"it fits with {', '.join(fitting)}" if fitting else
              f"even {', '.join(levers) or 'every memory lever'} would not make it fit; lower train.device_batch_size "
              "or use a device with more memory")
    raise ConfigError(f"the run needs about {estimate.total / GIB:.1f} GiB per process (--dry-run shows the parts) "
                      f"and {limit} leaves {(available + current) / GIB:.1f} GiB; {advice}")


def _millions(count: int) -> str:
    return f"{count / 1e9:.2f}B params" if count >= 1e9 else f"{count / 1e6:.1f}M params"


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

