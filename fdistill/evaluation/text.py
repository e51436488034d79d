"""The text judge: every sampler on each prompt set, sample ``i`` asking for prompt ``i % P``, judged by CLIP
score, FD against the set's reference images, compositional accuracy (sets whose prompts name attribute
combinations: the captioned shapes) and per-prompt diversity; PNG folders and prompt grids.

Entries record the prompt set (``prompts``), the teacher's guidance (``guidance_scale``, ``negative_prompt``),
the CLIP model (``clip_model``, by a name that holds no path of the machine: :func:`portable_clip_name`) and the
teacher (``teacher``, as the user named it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from fdistill.evaluation.images import fd_fields, feature_statistics
from fdistill.evaluation.loop import Drawn, Judge, SampleSet
from fdistill.metrics.diversity import group_diversity

SHAPES_CLIP_NAME = "fdistill-shapes-clip"  # the shipped captioned-shapes CLIP (fdistill/assets/shapes_clip)
GRID_PROMPTS, GRID_SEEDS = 8, 4


@dataclass
class PromptSet:
    """Prompts a run is evaluated on, the attribute combinations they name (captioned shapes only) and the
    reference images of their FD."""

    name: str
    prompts: list[str]
    reference: object
    combinations: list[tuple[int, int, int]] | None = None


class RowsOf:
    """The conditions of samples ``index``, one row of ``table`` (one embedding per distinct prompt) each,
    gathered only for the rows a sampler asks for, so that a large evaluation never holds one per sample."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        self.table, self.index = table, index

    def __getitem__(self, rows) -> torch.Tensor:
        return self.table[self.index[rows]]


def portable_clip_name(name: str) -> str:
    """How results name a CLIP model: the shipped captioned-shapes CLIP as ``fdistill-shapes-clip``, another
    ``local-dir:DIR`` by its directory's name (``local-dir:NAME``), an open_clip model by its name."""
    from fdistill.metrics.clip_score import LOCAL_DIR, SHAPES_CLIP_DIR

    if not name.startswith(LOCAL_DIR):
        return name
    folder = Path(name[len(LOCAL_DIR):])
    return SHAPES_CLIP_NAME if folder.resolve() == SHAPES_CLIP_DIR else f"{LOCAL_DIR}{folder.name}"


@dataclass
class TextJudge(Judge):
    """Samples of a latent text-to-image model on ``prompt_sets``. ``parts`` embed prompts and decode latents
    (:class:`~fdistill.pipelines.parts.LatentPipelineParts`); ``clip`` is the CLIP score's model, on ``device``;
    ``features`` the FD's feature network; ``protocol`` the guidance fields every entry records; latents are
    drawn and decoded ``batch_size`` at a time."""

    prompt_sets: list[PromptSet]
    parts: object
    clip: object
    features: str
    device: torch.device
    protocol: dict
    batch_size: int | None = None

    images = True

    @property
    def fields(self) -> dict:
        return {**self.protocol, "clip_model": portable_clip_name(self.clip.name), "teacher": self.parts.source}

    @cached_property
    def feature_net(self):
        from fdistill.metrics.fid import load_feature_net

        return load_feature_net(self.features)

    def sample_sets(self, n: int) -> list[SampleSet]:
        from fdistill.metrics.fid import reference_statistics

        sets = []
        for prompt_set in self.prompt_sets:
            reference = reference_statistics(prompt_set.reference, self.feature_net, "clean", progress=False)
            index = torch.arange(n) % len(prompt_set.prompts)
            conditions = RowsOf(self.parts.embed(prompt_set.prompts).cpu(), index)
            sets.append(SampleSet(conditions, index, reference, prompt_set.name.split()[0],
                                  {"prompts": prompt_set.name}))
        return sets

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.decode_all(x, self.batch_size)

    def score(self, drawn: Drawn, sample_set: SampleSet) -> dict:
        from fdistill.metrics.clip_score import clip_score_tensors

        prompt_set, index = self._prompt_set(sample_set), sample_set.groups
        images = drawn.pixels.float() / 127.5 - 1
        stats = feature_statistics(drawn.pixels, self.feature_net)
        entry = {"clip_score": clip_score_tensors(self.clip, images, [prompt_set.prompts[i] for i in index],
                                                  device=self.device),
                 **fd_fields(stats, sample_set.reference)}
        if prompt_set.combinations is not None:
            entry.update(self.compositional(images, [prompt_set.combinations[i] for i in index]))
        entry["prompt_diversity"] = group_diversity(stats.features, index)
        return entry

    def finish(self, sample_set: SampleSet, entries: list[dict], shown: dict[str, Drawn],
               samples_dir: Path | None) -> None:
        if samples_dir is not None and "student" in shown:
            write_prompt_grid(shown["student"], shown["teacher"], self._prompt_set(sample_set).prompts,
                              samples_dir / f"grid_{sample_set.name}.png")

    def _prompt_set(self, sample_set: SampleSet) -> PromptSet:
        return next(p for p in self.prompt_sets if p.name == sample_set.fields["prompts"])

    @cached_property
    def attribute_classifier(self):
        from fdistill.metrics.attributes import load_attribute_classifier

        return load_attribute_classifier()

    def compositional(self, images: torch.Tensor, combinations) -> dict:
        """Compositional accuracy of images in [-1, 1] and the colour, shape and position accuracies apart."""
        from fdistill.metrics.attributes import compositional_accuracy

        scores = compositional_accuracy(self.attribute_classifier, images, combinations)
        return {"compositional_accuracy": scores["accuracy"],
                **{f"{key}_accuracy": scores[key] for key in ("colour", "shape", "position")}}


def write_prompt_grid(student: Drawn, teacher: Drawn, prompts: list[str], path: Path) -> None:
    """Rows of up to ``GRID_PROMPTS`` prompts spread over ``prompts``, each written at the left, with
    ``GRID_SEEDS`` student samples and then ``GRID_SEEDS`` teacher samples (image ``i`` is of prompt
    ``i % len(prompts)``)."""
    from PIL import Image, ImageDraw

    num_prompts = len(prompts)
    rows = min(num_prompts, GRID_PROMPTS)
    shown = [row * num_prompts // rows for row in range(rows)]  # prompts spread over the set
    scale, text_width, header, gap = 2, 240, 16, 12
    side = student.pixels.shape[-1] * scale
    width = text_width + 2 * GRID_SEEDS * side + gap
    canvas = Image.new("RGB", (width, header + rows * side), "white")
    draw = ImageDraw.Draw(canvas)
    for column, drawn in enumerate((student, teacher)):
        left = text_width + column * (GRID_SEEDS * side + gap)
        draw.text((left + 2, 2), drawn.title, fill="black")
        for row, prompt in enumerate(shown):
            for seed in range(GRID_SEEDS):
                i = prompt + seed * num_prompts
                if i >= len(drawn.pixels):
                    continue
                image = Image.fromarray(drawn.pixels[i].permute(1, 2, 0).numpy()).resize((side, side), Image.NEAREST)
                canvas.paste(image, (left + seed * side, header + row * side))
    for row, prompt in enumerate(shown):
        draw.text((4, header + row * side + side // 2 - 6), prompts[prompt], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
