"""Export a trained student as a diffusers pipeline that plain diffusers serves, with stock classes only.

The directory is a stock ``ConsistencyModelPipeline`` (pixel students) or the teacher's text-to-image pipeline
class (latent students, with the teacher's VAE, text encoders and tokenizers), written by ``save_pretrained`` (a
LoRA student's adapters merged into the weights), with the student's network and a stock scheduler that samples
it as fdistill does:

* a UNet student (``ConsistencyModelPipeline``, ``StableDiffusionPipeline``): a stock ``LCMScheduler`` configured
  with the teacher's noise table (:mod:`fdistill.samplers.lcm`);
* a flow-matching transformer student (``StableDiffusion3Pipeline``, ``FluxPipeline``, ``SanaPipeline``): a stock
  ``FlowMatchEulerDiscreteScheduler`` with no shift (:mod:`fdistill.samplers.flow`), driven by
  ``sigmas = [t / 1000 for t in student_times]``;
* a VP transformer student (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``): the ``LCMScheduler`` as for UNets;
* a class-conditional latent transformer student (``DiTPipeline``, which passes no timesteps): an ``LCMScheduler``
  whose own spacing starts at the student's first time (``original_inference_steps = t_0 + 1``), so
  ``num_inference_steps=1`` samples it; ``fdistill.json``'s ``pipeline_steps`` lists the step counts whose
  spacing is the student's. The pipeline does not hand its generator to the scheduler, so the fresh noise of a
  multi-step sample comes from torch's global RNG;

plus
``fdistill.json`` (how it was made) and ``README.md`` (a model card with the Hub's metadata block). Loading it
needs diffusers alone, no fdistill::

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("runs/x/pipeline")
    images = pipe(batch_size=8, class_labels=[0, 1, 2, 3, 4, 5, 6, 7], num_inference_steps=None,
                  timesteps=[999], generator=torch.Generator().manual_seed(0)).images

``timesteps`` are the student's first ``K`` sampling times for a ``K``-step sample (``fdistill.json`` lists them).
A text-to-image export's ``fdistill.json`` also holds the keyword arguments of its pipeline call (``call``: guidance
off, or Flux's embedded guidance; the size and prompt length it was trained at) and of ``from_pretrained``
(``load_kwargs``), and which argument takes its steps (``step_argument``: ``sigmas`` or ``timesteps``). Pass
``class_labels`` to a class-conditional student: without them the pipeline draws labels uniformly from
every class embedding, the null (unconditional) class included.

With the same seed, ``pipe(..., output_type="pt")`` equals ``(student.sample(z, cond, K, "sde", g) / 2 + 0.5)
.clamp(0, 1)`` bit for bit, ``z = student.noise(n, generator=g)``: the pipeline draws its latents and the noise
between steps from the same generator in the same order, and the scheduler's arithmetic is the student's. A LoRA
student's merged weights round differently from its base weights plus adapters, so its export agrees to float
precision rather than bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fdistill.errors import ConfigError
from fdistill.networks.generator import Generator
from fdistill.networks.lora import adapter_config, adapter_state_dict, has_adapters, merged_network
from fdistill.pipelines.specs import PIXEL_SPEC, SPECS, PipelineSpec
from fdistill.samplers.flow import FlowMatchSampling

METADATA_FILE = "fdistill.json"
MODEL_CARD = "README.md"
LORA_DIR = "lora"  # a LoRA student's adapters, for the teacher's pipeline
SHARD_SIZE = "1GB"  # weight files are split at this size (the serialiser holds one whole file in memory)
KOHYA_LORA_FILE = "student_lora_kohya.safetensors"  # the same adapters in the kohya format (A1111, ComfyUI)


def portable_path(path: str | Path) -> str:
    """``path`` as an export records it: relative to the working directory when it lies below it, else its last
    two parts (a run directory and its checkpoint), never an absolute path of the machine that made it."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(*path.parts[-2:]))


def load_snippet(times: list[int], class_embeds: int | None, serving: dict | None = None,
                 spec: PipelineSpec = PIXEL_SPEC) -> str:
    """How to sample the export with plain diffusers (``DIR`` stands for its path or hub id). ``serving`` is a text
    student's pipeline call (:func:`text_serving`)."""
    if serving is not None:
        return (f"import torch\nfrom diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained(DIR{_keywords(serving['load_kwargs'])})\n"
                f"images = pipe(prompt=[\"a red circle at the top left\"]{_keywords(serving['call'])},\n"
                f"              {serving['step_argument']}={serving['steps'][:1]},\n"
                f"              generator=torch.Generator().manual_seed(0)).images"
                f"  # K steps: {serving['step_argument']}={serving['steps']}[:K]")
    labels = list(range(min(4, class_embeds - 1))) if class_embeds else []
    if not spec.takes_timesteps:
        return (f"import torch\nfrom diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained(DIR)\n"
                f"images = pipe(class_labels={labels}, guidance_scale=1.0, num_inference_steps=1,\n"
                f"              generator=torch.Generator().manual_seed(0)).images")
    label_argument = f", class_labels={labels}" if class_embeds else ""
    return (f"import torch\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained(DIR)\n"
            f"images = pipe(batch_size=4{label_argument}, num_inference_steps=None, timesteps={times[:1]},\n"
            f"              generator=torch.Generator().manual_seed(0)).images  # K steps: timesteps={times}[:K]")


def pipeline_step_counts(scheduler, times: list[int]) -> list[int]:
    """The step counts ``K`` at which ``scheduler.set_timesteps(K)`` visits the student's first ``K`` times."""
    import copy

    counts = []
    for k in range(1, len(times) + 1):
        probe = copy.deepcopy(scheduler)
        probe.set_timesteps(k)
        if probe.timesteps.tolist() == times[:k]:
            counts.append(k)
    return counts


def _keywords(arguments: dict) -> str:
    return "".join(f", {key}={value!r}" for key, value in arguments.items())


def text_serving(net, parts, times: list, flow: bool) -> dict:
    """How the stock pipeline samples a text student: ``call`` (keyword arguments of ``pipe(...)``: the
    network's own, e.g. Flux's embedded guidance, else ``guidance_scale=1``, since the student is never guided;
    the size and T5 prompt length it was trained at), ``load_kwargs`` (of ``from_pretrained``: an SD3 pipeline
    saved without its T5 loads only when told so), and ``step_argument`` with its ``steps``: the student's sigmas
    for a flow student, else its timesteps."""
    call = {"guidance_scale": 1.0}
    if parts.spec.sized_call:
        pixels = net.sample_shape[-1] * parts.vae_scale_factor
        call.update(height=pixels, width=pixels)
    if parts.spec.max_sequence_length is not None:
        call.update(max_sequence_length=parts.max_sequence_length)
    call.update(parts.spec.call_arguments)
    call.update(net.pipeline_call_arguments())
    no_t5 = "text_encoder_3" in parts.parts and parts.parts["text_encoder_3"] is None
    load_kwargs = {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}
    if flow:
        steps = [t / net.schedule.num_train_timesteps for t in times]
        return {"call": call, "load_kwargs": load_kwargs, "step_argument": "sigmas", "steps": steps}
    return {"call": {**call, "num_inference_steps": None}, "load_kwargs": load_kwargs, "step_argument": "timesteps",
            "steps": times}


def _fdistill_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fdistill")
    except PackageNotFoundError:
        return "unknown"


def exportable_network(student: Generator):
    """The student's diffusers denoiser (a UNet or a flow-matching transformer), or an error saying why this
    student cannot be exported."""
    net, kind = student.net, type(student.net).__name__
    model = getattr(net, "network", None)
    if model is None:
        raise ValueError(f"export needs a diffusers UNet or transformer student; this student is a {kind}")
    exportable = sorted({name for spec in SPECS.values() for name in spec.denoiser_classes})
    if type(model).__name__ not in exportable:
        raise ValueError(f"export needs a diffusers {', '.join(exportable)} student, not a {type(model).__name__}")
    if student.stock is None:
        raise ValueError("export needs a student on a diffusers scheduler's timesteps (a diffusers teacher)")
    return net


def model_card(info: dict) -> str:
    """``README.md`` of an exported student: the Hub's metadata block, what it is, its metrics, how to load it."""
    teacher = info.get("teacher") or {}
    base = teacher.get("source") if teacher.get("kind") == "pretrained" else None
    text = info.get("text_to_image", False)
    tag = "text-to-image" if text else "unconditional-image-generation"
    header = ["---", "library_name: diffusers", f"pipeline_tag: {tag}",
              "tags:", "- fdistill", "- distillation", "- one-step", f"- {info.get('objective', 'unknown')}"]
    header += [f"base_model: {base}"] if base else []
    header += ["---", ""]
    times, objective = info["student_times"], info.get("objective", "unknown")
    guidance = teacher.get("guidance_scale", 1.0)
    channels, *size = info["sample_shape"]
    classes = f"; classes 0..{info['num_classes'] - 1}" if info.get("num_classes") else ""
    lines = [f"# One-step student ({objective}, distilled with fdistill)", "",
             f"A {info['max_steps']}-step student (sampling timesteps {times}) of the teacher "
             f"`{teacher.get('source') or teacher.get('kind', 'unknown')}`"
             f"{f' with guidance scale {guidance}' if guidance != 1 else ''}, trained for "
             f"{info.get('training_steps', '?')} steps with the `{objective}` objective (weights: "
             f"{info.get('ema') or 'trained, no EMA'}). Images are {'x'.join(map(str, size))} with {channels} "
             f"channel(s){classes}.", ""]
    results = info.get("results")
    if results and text:
        lines += ["## Metrics", "", "| model | NFE | prompts | CLIP score | FD | compositional accuracy | samples/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in results:
            acc = r.get("compositional_accuracy")
            lines.append(f"| {r['model']} | {r['nfe']} | {r['prompts']} | {r['clip_score']:.2f} | {r['fd']:.2f} | "
                         f"{'-' if acc is None else f'{acc:.3f}'} | {r['samples_per_second']:.1f} |")
        first = results[0]
        lines += ["", f"Protocol: {first['num_samples']} samples, seed {first['seed']}, prompt i % P for sample i; "
                      f"teacher guidance scale {first['guidance_scale']} (negative prompt "
                      f"{first['negative_prompt']!r}); CLIP score with `{first['clip_model']}`; FD in "
                      f"`{first['feature_net']}` features against {first['reference']} ({first['num_reference']} "
                      "images); samples/s include the VAE decode.", ""]
    elif results:
        lines += ["## Metrics", "", "| model | NFE | FD | class accuracy | samples/s |", "|---|---|---|---|---|"]
        for r in results:
            fd, acc = r.get("fd"), r.get("class_accuracy")
            lines.append(f"| {r['model']} | {r['nfe']} | {'-' if fd is None else f'{fd:.2f}'} | "
                         f"{'-' if acc is None else f'{acc:.3f}'} | {r.get('samples_per_second', 0):.1f} |")
        first = results[0]
        lines += ["", f"Protocol: {first.get('num_samples')} samples, seed {first.get('seed')}, labels "
                      f"{first.get('labels')}; FD in `{first.get('feature_net')}` features (weights "
                      f"{first.get('weights_hash')}) against {first.get('reference')} ({first.get('num_reference')} "
                      "images); the teacher row is its multi-step sampler under the same protocol.", ""]
    lines += ["## Use", "", "Plain diffusers, no fdistill needed:", "", "```python",
              info["load"].replace("DIR", '"PATH_OR_HUB_ID"'), "```", ""]
    if text:
        lines += ["Keep `guidance_scale=1.0`: the teacher's guidance is distilled into the student, which is never "
                  "guided again.", ""]
    if info.get("load_lora"):
        lines += ["The student's LoRA adapters are also in `lora/`. The teacher's own pipeline samples like the "
                  "student with them:", "", "```python", info["load_lora"].replace("DIR", '"PATH"'), "```", ""]
    if info.get("kohya_lora"):
        lines += [f"The same adapters in the kohya format, for A1111, ComfyUI and other tools that read it: "
                  f"`{info['kohya_lora']}` (sample with the student's scheduler and steps above).", ""]
    if info.get("num_class_embeds"):
        drawn = ("" if "pipeline_steps" in info
                 else ", which the pipeline would otherwise draw among random labels")
        lines += [f"Pass `class_labels`: class {info['null_class']} is the null (unconditional) class{drawn}.", ""]
    return "\n".join(header + lines)


def export_pipeline(student: Generator, out_dir: str | Path, metadata: dict | None = None,
                    parts=None, in_place: bool = False) -> Path:
    """Write ``student`` (as it is served, :meth:`~fdistill.networks.generator.Generator.servable`) as a diffusers
    ``ConsistencyModelPipeline`` directory (a pixel student), or as its teacher's pipeline class with ``parts``'s
    VAE, text encoders and tokenizers (:class:`~fdistill.pipelines.parts.LatentPipelineParts`) for a latent
    student, and return its path.

    A LoRA student of a text-to-image teacher also gets ``lora/``: its adapters as diffusers LoRA weights, which
    the teacher's own pipeline loads with ``load_lora_weights``, and the stock scheduler that samples them
    (:func:`save_lora`).

    ``metadata`` (objective, training steps, teacher, metrics, ...) goes into ``fdistill.json`` and the model card
    next to what the export knows itself (times, prediction type, classes, fdistill version, how to load); its
    keys win, e.g. ``num_classes`` for a UNet whose last class embedding is a real class rather than the null one.
    The directory is written beside ``out_dir`` and renamed into place, so ``out_dir`` never holds a partial
    export; an existing ``out_dir`` is replaced only if it is an earlier export (or empty). Weight files are
    written in shards of at most :data:`SHARD_SIZE`, which bounds the serialisation buffer.

    ``in_place`` (for an export that is the last use of the run's networks): a LoRA student's adapter is merged
    into the shared base's own weights rather than into a copy (:func:`fdistill.networks.lora.merged_network`).
    """
    student = student.servable()  # an sCM/rCM student: its network at the SNR-matched timesteps
    net = exportable_network(student)
    if net.text_conditioned and parts is None:
        raise ValueError("a text-conditioned student exports with its teacher's VAE, text encoder and tokenizer; "
                         "pass its pipeline parts")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and ((out / METADATA_FILE).is_file() or not any(out.iterdir()))):
        raise ConfigError(f"{out} exists and is not an exported pipeline; choose another output directory")
    class_embeds = net.num_class_embeds
    flow = isinstance(student.stock, FlowMatchSampling)
    times = [float(t) for t in student.times] if flow else [int(t) for t in student.times]
    serving = text_serving(net, parts, times, flow) if net.text_conditioned else None
    spec = parts.spec if parts is not None else PIXEL_SPEC
    if not spec.takes_timesteps:
        scheduler = student.stock.scheduler(first_timestep=times[0])
        pipeline_steps = pipeline_step_counts(scheduler, times)
        if 1 not in pipeline_steps:
            raise ValueError(f"{spec.name} passes no timesteps, and its LCMScheduler cannot start a one-step sample "
                             f"at the student's time {times[0]}; train with generator.times=[t] for t >= "
                             f"{len(student.net.schedule.alphas_cumprod) // 2} (e.g. [999])")
    else:
        scheduler = student.stock.scheduler()
    info = {
        "format": f"diffusers {spec.name} + {type(scheduler).__name__} (stock classes), exported by fdistill",
        "fdistill_version": _fdistill_version(),
        "student_times": times,
        "max_steps": student.max_steps,
        "prediction_type": net.prediction_type,
        "sample_shape": list(net.sample_shape),
        # fdistill's convention (UNetDenoiser.null_condition): the last class embedding is the null class.
        "num_class_embeds": class_embeds,
        "num_classes": class_embeds - 1 if class_embeds else None,
        "null_class": class_embeds - 1 if class_embeds else None,
        "text_to_image": net.text_conditioned,
        **(serving or {}),
        **({} if spec.takes_timesteps else {"pipeline_steps": pipeline_steps}),
        "load": load_snippet(times, class_embeds, serving, spec),
        **(metadata or {}),
    }
    lora = net.text_conditioned and has_adapters(net) and spec.lora
    if lora:
        info["load_lora"] = lora_snippet(parts.source, type(scheduler).__name__, serving, spec.lora_scale_argument)
        if spec.kohya_lora:
            info["kohya_lora"] = f"{LORA_DIR}/{KOHYA_LORA_FILE}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if lora:  # before the merge, which an in-place merge ends the adapters with
            save_lora(net, spec, scheduler, tmp / LORA_DIR)
        stock_pipeline(net, scheduler, parts, in_place).save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / MODEL_CARD).write_text(model_card(info))
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_lora(net, spec: PipelineSpec, scheduler, out: Path) -> None:
    """Write ``net``'s LoRA adapters as diffusers LoRA weights (``pytorch_lora_weights.safetensors``, with their
    rank, alpha and target modules as adapter metadata) that the spec's pipeline class loads into the teacher's
    pipeline with ``load_lora_weights``, and ``scheduler`` (the stock scheduler that samples the student) in
    ``out/scheduler``. Where the spec says the kohya format applies (Stable Diffusion 1.x/2.x and SDXL UNets), the
    same adapters are also written in it (:func:`save_kohya_lora`)."""
    role, layers, config = spec.denoiser_role, adapter_state_dict(net), adapter_config(net)
    spec.pipeline_class().save_lora_weights(
        out, **{f"{role}_lora_layers": layers, f"{role}_lora_adapter_metadata": config.to_dict()})
    if spec.kohya_lora:
        save_kohya_lora(layers, config, role, out / KOHYA_LORA_FILE)
    scheduler.save_pretrained(out / "scheduler")


def save_kohya_lora(layers: dict, peft_config, role: str, path: Path) -> None:
    """Write peft LoRA ``layers`` of the pipeline component ``role`` in the kohya format that A1111, ComfyUI and
    diffusers' ``load_lora_weights`` read (``lora_unet_<module>.lora_down/lora_up.weight`` and ``.alpha``), converted
    by diffusers' ``convert_state_dict_to_kohya``. That converter writes every alpha as the rank (a scale of 1); the
    adapters' own ``lora_alpha`` (one for all modules, as fdistill's LoRA has) is written instead, so the kohya file
    scales the update by ``alpha / rank`` as the student does."""
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    kohya = convert_state_dict_to_kohya({f"{role}.{key}": value for key, value in layers.items()})
    alpha = torch.tensor(float(peft_config.lora_alpha))
    kohya = {key: alpha.clone() if key.endswith(".alpha") else value.contiguous() for key, value in kohya.items()}
    save_file(kohya, str(path))


def lora_snippet(teacher: str, scheduler_class: str, serving: dict, scale_argument: str) -> str:
    """How the teacher's pipeline samples like the student with the exported LoRA (``DIR``: the export);
    ``scale_argument`` is the pipeline argument that carries the LoRA scale."""
    return (f"import torch\nfrom diffusers import DiffusionPipeline, {scheduler_class}\n\n"
            f"pipe = DiffusionPipeline.from_pretrained({teacher!r}{_keywords(serving['load_kwargs'])})  # the teacher\n"
            f"pipe.load_lora_weights(DIR + \"/{LORA_DIR}\")\n"
            f"pipe.scheduler = {scheduler_class}.from_pretrained(DIR + \"/{LORA_DIR}\", subfolder=\"scheduler\")\n"
            f"images = pipe(prompt=[\"a red circle at the top left\"]{_keywords(serving['call'])},\n"
            f"              {serving['step_argument']}={serving['steps'][:1]},\n"
            f"              {scale_argument}={{\"scale\": 1.0}},  # the LoRA scale\n"
            f"              generator=torch.Generator().manual_seed(0)).images")


def stock_pipeline(net, scheduler, parts=None, in_place: bool = False):
    """The stock diffusers pipeline that samples ``net``'s diffusers model with ``scheduler``: a
    ``ConsistencyModelPipeline`` for a pixel UNet, else the teacher's pipeline class with ``parts``'s
    components. A LoRA model's adapters are merged into its weights (:func:`fdistill.networks.lora.merged_network`,
    into the base itself with ``in_place``)."""
    model = merged_network(net, in_place)
    if parts is None:
        return PIXEL_SPEC.pipeline_class()(**{PIXEL_SPEC.denoiser_role: model}, scheduler=scheduler)
    return parts.pipeline(model, scheduler)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an old ``out`` is moved aside first and deleted only afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".old-{out.name}-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)
