"""Evaluation: the per-reward table of a base model and its adapters, image grids, and samples during training.

```python
from trl_diffusion_opd.evaluation import EvaluationConfig, evaluate_models

result = evaluate_models(
    pipeline,  # a diffusers SD3 / FLUX pipeline
    prompts={"ocr": "data/ocr/test.txt", "pickscore": "data/pickscore/test.txt", "aesthetic": "data/pickscore/test.txt"},
    adapters={"OCR teacher": "quanhaol/DiffusionOPD/OCRTeacher/lora", "student": "sd35m-diffusion-opd"},
    config=EvaluationConfig(num_inference_steps=40, output_dir="eval"),  # or the same settings as keywords
)
print(result.to_markdown())
```

`prompts` maps each table column to a prompt source (the forms training accepts). A column is a reward name, or
`reward@label` to score one reward on several prompt sets. Columns with the same prompts share their images: every
model generates each distinct prompt set once, with the same per-image seeds for every row, and every reward of those
columns scores them. Adapters are loaded the way users load them (`pipe.load_lora_weights(folder,
adapter_name=...)`; PEFT-format folders, which `load_lora_weights` silently ignores, through PEFT) and switched with
`set_adapters` / `disable_lora` for the base row. On a pipeline with several experts (Wan 2.2 A14B: `transformer` for
high noise, `transformer_2` for low noise; the family's `experts`), each expert's file of an adapter folder
(`pytorch_lora_weights.safetensors`, `pytorch_lora_weights_transformer_2.safetensors`) loads into that expert under the
row's adapter name, and an expert without a file runs its base weights in that row.

The training-time callbacks that sample and score the student (`RewardEvalCallback`) live in
`trl_diffusion_opd.trainer.callbacks`; the `eval` command's arguments in `trl_diffusion_opd.scripts.eval`; the grids,
videos and comparison figure in `trl_diffusion_opd.figures`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data import load_prompt_source, row_images
from .families.base import get_family
from .figures import (  # noqa: F401  (the figures were defined here: `evaluation.make_grid` etc. keep working)
    VIDEO_FORMATS,
    blank_like,
    comparison_figure,
    frame_grid,
    frame_indices,
    is_video,
    make_grid,
    save_video,
)
from .lora_io import (
    DIFFUSERS_LORA_WEIGHTS,
    EXPERT_LORA_PATTERN,
    check_lora_fits,
    expert_of_weight_file,
    expert_weight_name,
    has_expert_lora,
    lora_file_shapes,
)
from .registry import load_pipeline
from .rewards import Reward, as_reward, get_reward, nanmean
from .sizes import Resolution, format_resolution, image_size
from .teachers import check_teacher_files, load_lora_teacher, parse_teacher_spec, resolve_teacher, several_adapters


RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
GRIDS_DIR = "grids"
VIDEOS_DIR = "videos"
SAMPLES_DIR = "samples"  # of `output_dir`: pushed with the adapter (`hub.UPLOAD_PATTERNS`), shown by the model card


def _file_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "model"


def _adapter_name(label: str) -> str:
    name = re.sub(r"\W", "_", label)
    return name if name and not name[0].isdigit() else f"adapter_{name}"


# ---------------------------------------------------------------------------------------------- models
def load_base_pipeline(
    name: str,
    torch_dtype: str = "auto",
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    device: str | None = None,
):
    """The base pipeline, ready to sample: a Hub id, a local folder or a registered name (`tiny:sd3`, `world:base`,
    ...: `registry.load_pipeline`), without progress bars, on `device` (`None`: CUDA when available)."""
    pipeline = load_pipeline(name, torch_dtype=torch_dtype, revision=revision, cache_dir=cache_dir, token=token)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@dataclass
class EvalModel:
    """One row of the table: the base (`adapter_name=None`) or an adapter on it.

    `experts` names the pipeline components (the family's `experts`) that carry the adapter's LoRA; the others run
    their base weights in this row (a Wan 2.2 adapter with a `transformer_2` LoRA only)."""

    label: str
    adapter_name: str | None = None
    source: str | None = None
    guidance_scale: float | None = None
    prompt_templates: dict[str, str] | None = None
    experts: tuple[str, ...] = ("transformer",)


def pipeline_experts(pipeline) -> dict[str, torch.nn.Module]:
    """The transformers of `pipeline` that carry LoRAs, by component name, the default one first: its family's
    `experts` (Wan 2.2 A14B: `transformer` and `transformer_2`), or `{"transformer": pipeline.transformer}` for a
    pipeline that no family handles (it is only sampled through its own `__call__` here)."""
    try:
        family = get_family(pipeline)
    except ValueError:  # no registered family for this pipeline class
        return {"transformer": pipeline.transformer}
    return family.experts


def load_adapter(pipeline, label: str, spec: Any, cache_dir: str | None = None, token=None) -> EvalModel:
    """Load the LoRA `spec` (local folder, Hub id `owner/repo[/sub/folder][@revision]` or a dict with `path`,
    `subfolder`, `revision`, `weight_name`, `guidance_scale`, `prompt_templates`) on `pipeline` as the adapter of
    row `label`. `prompt_templates` (`{column: template with "{prompt}"}`) samples that column's prompts through the
    template, as a student trained with `task_prompt_templates` expects; rewards still read the prompts as written.

    Diffusers-format folders go through `pipeline.load_lora_weights`, as users load them (a file with transformer
    weights only straight into the transformer, as `load_lora_weights` does, without its "No LoRA keys associated to
    CLIPTextModel..." warning per text encoder); PEFT-format folders
    (`adapter_config.json` + `adapter_model.safetensors`, e.g. the released DiffusionOPD teachers), which
    `load_lora_weights` would silently skip, through PEFT with their own rank and alpha.

    With several experts (`pipeline_experts`; Wan 2.2 A14B), the LoRA of each further expert is its own file
    (`lora_io.expert_weight_name`: `pytorch_lora_weights_transformer_2.safetensors`, as the trainers save it) and
    loads as diffusers documents it, `pipeline.load_lora_weights(folder, weight_name=...,
    load_into_transformer_2=True)`, under the same adapter name. A folder may hold files for some experts only; the
    others then run their base weights in this row (`EvalModel.experts`).

    Raises:
        ValueError: the adapter cannot be found, holds a LoRA for a component the pipeline does not run as an
            expert (a Wan 2.2 `transformer_2` file on a Wan 2.1 pipeline), or loads no weight into an expert it has
            a file for.
    """
    name = _adapter_name(label)
    templates = None
    if isinstance(spec, dict) and "prompt_templates" in spec:
        spec = dict(spec)
        templates = dict(spec.pop("prompt_templates") or {})
        for column, template in templates.items():
            if not isinstance(template, str) or "{prompt}" not in template:
                raise ValueError(f"Adapter '{label}': prompt template of '{column}' must contain '{{prompt}}'.")
    spec = parse_teacher_spec(name, spec)
    folder = resolve_teacher(spec, cache_dir=cache_dir, token=token)
    if spec.full_weight:
        raise ValueError(f"Adapter '{label}' ({spec.display}) is a full model, not a LoRA: evaluate it as the base.")
    check_teacher_files(spec, owner=f"Adapter '{label}'")
    experts = pipeline_experts(pipeline)
    first = next(iter(experts))
    components = getattr(pipeline, "components", {})
    for path in sorted(folder.glob(EXPERT_LORA_PATTERN)):
        component = expert_of_weight_file(path.name)
        if component in components and component not in experts:  # silently ignoring it would evaluate another model
            raise ValueError(
                f"Adapter '{label}' ({spec.display}) holds a LoRA for '{component}' ({path.name}), which this "
                f"{type(pipeline).__name__} does not run (its experts: {', '.join(experts)})."
            )
    found = [e for e in experts if has_expert_lora(folder, e, spec.weight_name)]
    if not found:
        files = [expert_weight_name(e, spec.weight_name) or DIFFUSERS_LORA_WEIGHTS for e in experts]
        raise ValueError(f"Adapter '{label}' ({spec.display}) has none of the expert LoRAs {files}.")
    weight_name = spec.weight_name or DIFFUSERS_LORA_WEIGHTS
    peft_format = (folder / "adapter_config.json").is_file()
    for expert in found:  # PEFT-format folders are checked by `load_lora_teacher`, as teachers are
        if expert != first or not peft_format:
            path = folder / (weight_name if expert == first else expert_weight_name(expert, spec.weight_name))
            if path.is_file():
                owner = f"Adapter '{label}' ({spec.display})"
                check_lora_fits(experts[expert], lora_file_shapes(path), owner, expert)
    with several_adapters():
        for expert in found:
            if expert != first:
                # diffusers' loader for a further expert (Wan 2.2: `load_into_transformer_2=True`), as the model card
                # tells users to load it; it converts LoRAs of other trainers' key layouts as for the first expert.
                pipeline.load_lora_weights(
                    str(folder),
                    weight_name=expert_weight_name(expert, spec.weight_name),
                    adapter_name=name,
                    **{f"load_into_{expert}": True},
                )
            elif (folder / weight_name).is_file() and not (folder / "adapter_config.json").is_file():
                if _transformer_only(folder / weight_name) and hasattr(experts[expert], "load_lora_adapter"):
                    experts[expert].load_lora_adapter(
                        str(folder),
                        weight_name=weight_name,
                        prefix="transformer",
                        adapter_name=name,
                        _pipeline=pipeline,
                    )
                else:
                    pipeline.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
            else:
                load_lora_teacher(experts[expert], spec, folder, owner=f"Adapter '{label}'")
    for expert in found:
        if not any(f".{name}." in key for key, _ in experts[expert].named_parameters()):
            raise ValueError(f"Adapter '{label}' ({spec.display}) loaded no LoRA weight into the {expert}.")
    return EvalModel(
        label=label,
        adapter_name=name,
        source=spec.display,
        guidance_scale=spec.guidance_scale,
        prompt_templates=templates,
        experts=tuple(found),
    )


def _set_template(model: EvalModel, columns: list[str]) -> str:
    """The prompt template of `model` for a prompt set scored by `columns` (`"{prompt}"` when it has none)."""
    templates = {(model.prompt_templates or {}).get(column, "{prompt}") for column in columns}
    if len(templates) > 1:
        raise ValueError(
            f"Adapter '{model.label}' gives different prompt templates to columns {columns}, which share prompts."
        )
    return templates.pop()


def _transformer_only(path: Path) -> bool:
    """Whether a diffusers LoRA file holds transformer weights only (what this package saves)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return False
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    return bool(keys) and all(key.startswith("transformer.") for key in keys)


def _activate(pipeline, model: EvalModel, has_adapters: bool, experts: Sequence[str] = ("transformer",)) -> None:
    """Run `model`'s row: its adapter alone on every expert of `experts` (component names) that carries it, the base
    weights on the others; the base row: every LoRA off."""
    if model.adapter_name is None:
        if has_adapters:
            pipeline.disable_lora()
        return
    pipeline.enable_lora()
    pipeline.set_adapters(model.adapter_name)
    # An expert without this row's LoRA (a Wan 2.2 adapter for `transformer_2` only) runs its base weights. diffusers'
    # `set_adapters` makes the missing name active there, which PEFT's layers skip; switching the expert's LoRAs off
    # says so without relying on that.
    for component in experts:
        if component not in model.experts:
            getattr(pipeline, component).disable_lora()


def generate_images(
    pipeline,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int = 40,
    guidance_scale: float = 4.5,
    resolution: Resolution = 512,
    max_sequence_length: int | None = None,
    num_frames: int | None = None,
    guidance_scale_2: float | None = None,
    images: list | None = None,
    family_kwargs: dict | None = None,
) -> list:
    """Images (or videos) from the pipeline's own sampler (the image families: the deterministic flow-matching Euler
    ODE; Wan: the Hub pipelines' UniPC solver, as users sample), one seeded generator per sample, so a sample
    depends only on its prompt and seed, not on the batch it was drawn in.

    Args:
        num_frames, guidance_scale_2: Passed to the pipeline when set (video pipelines; Wan 2.2's low-noise CFG).
        images: Editing and image-to-video pipelines: each prompt's input images (a list of PIL images; Wan I2V:
            the first frame, and a last frame where the pipeline takes one). The pipelines take one set per call,
            so each prompt is sampled by its own call, with the family's image and guidance arguments
            (`pipeline_image_kwargs`, `pipeline_guidance_kwargs` with the negative prompt `""`).
        family_kwargs: The family's own options, as the training config's `family_kwargs` (e.g. FLUX.1 Kontext's
            `auto_resize`, Qwen-Image-2.1's `output_resolution`), so that samples are drawn as the student was trained.

    Returns:
        One PIL image per prompt, or for a video pipeline (whose output has `frames`) one list of PIL frames.
    """
    try:
        family = get_family(pipeline)
    except ValueError:  # no registered family for this pipeline class: sampled through `__call__` as it is
        family = None
    if family is not None and family_kwargs:
        family = get_family(pipeline, family_kwargs)  # an option the family does not have: one-line ValueError
    if images is not None and any(images):
        if family is None:
            raise ValueError(f"{type(pipeline).__name__} is not a supported editing pipeline: rows have input images.")
        outputs = []
        for prompt, seed, row in zip(prompts, seeds, images):
            kwargs = {
                **family.pipeline_guidance_kwargs(guidance_scale, ""),
                **family.pipeline_image_kwargs(row, resolution),
            }
            if max_sequence_length is not None and _takes(pipeline, "max_sequence_length"):
                kwargs["max_sequence_length"] = max_sequence_length
            if num_frames is not None:  # image-to-video pipelines
                kwargs["num_frames"] = num_frames
            if guidance_scale_2 is not None:
                kwargs["guidance_scale_2"] = guidance_scale_2
            outputs += _samples(
                pipeline(
                    prompt=prompt,
                    num_inference_steps=num_inference_steps,
                    height=image_size(resolution)[0],
                    width=image_size(resolution)[1],
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="pil",
                    **kwargs,
                )
            )
        return outputs
    # A pipeline without `guidance_scale` (Qwen-Image-2.1: `true_cfg_scale` only) gets its family's guidance arguments.
    plain = family is None or _takes(pipeline, "guidance_scale")
    kwargs = {
        "prompt": prompts,
        "num_inference_steps": num_inference_steps,
        **({"guidance_scale": guidance_scale} if plain else family.pipeline_guidance_kwargs(guidance_scale, "")),
        "height": image_size(resolution)[0],
        "width": image_size(resolution)[1],
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        "output_type": "pil",
    }
    if max_sequence_length is not None and _takes(pipeline, "max_sequence_length"):
        kwargs["max_sequence_length"] = max_sequence_length
    if num_frames is not None:
        kwargs["num_frames"] = num_frames
    if guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = guidance_scale_2
    if family is not None:
        kwargs.update(family.pipeline_image_kwargs([], resolution))  # FLUX.1 Kontext: `max_area`
    return _samples(pipeline(**kwargs))


def _takes(pipeline, argument: str) -> bool:
    """Whether the pipeline's `__call__` has the keyword `argument` (Qwen-Image-2.1's has no `max_sequence_length`)."""
    return argument in inspect.signature(type(pipeline).__call__).parameters


def _samples(output) -> list:
    """A pipeline output's images, or for a video pipeline (whose output has `frames`) its videos as lists of frames."""
    if hasattr(output, "images"):
        return output.images
    return [list(video) for video in output.frames]


# ---------------------------------------------------------------------------------------------- the table
def sampler_name(settings: dict[str, Any]) -> str:
    """How an evaluation sampled: "Euler ODE" for the flow-matching Euler scheduler (or when not recorded), else
    the pipeline's scheduler class (Wan's Hub pipelines: `UniPCMultistepScheduler`)."""
    scheduler = settings.get("scheduler")
    return "Euler ODE" if scheduler in (None, "FlowMatchEulerDiscreteScheduler") else scheduler


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass
class EvaluationResult:
    """Scores of every model (row) on every column (reward on a prompt set).

    Attributes:
        columns: Column names (`reward` or `reward@label`).
        models: The rows.
        scores: `{label: {column: mean score}}` (nan-skipping means).
        counts: `{label: {column: images with a score}}`.
        per_image: `{label: {column: [score per image]}}`, in prompt order.
        ranges: `{column: (low, high)}` of the normalisation behind `average`; `None` leaves a column out.
        average: `{label: mean over columns of (score - low) / (high - low)}`.
        grids: `{label: path of its image grid}` (videos: its frame grid, a row per video); a prompt set with input
            images (editing) has a row of each sample's first input image above its samples, an image-to-video set
            each video's input frame as its first column.
        videos: `{label: [paths of its sample videos]}` (video pipelines only).
        settings: Sampling settings and prompt counts.
        samples: `{label: [images of prompt set k]}`, the first `grid_size` images of every prompt set (the grids'
            images, the same seeds for every row), for figures such as `comparison_figure`.
        sample_prompts: `[prompts of set k]`, the prompts of those images.
        sample_inputs: `[first input image of each of those samples]` per set (editing sets; `[]` for text-only
            sets), e.g. the "input" row of a `comparison_figure`.
    """

    columns: list[str]
    models: list[EvalModel]
    scores: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]]
    per_image: dict[str, dict[str, list[float]]]
    ranges: dict[str, tuple[float, float] | None]
    average: dict[str, float]
    grids: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[list[Image.Image]]] = field(default_factory=dict, repr=False)
    sample_prompts: list[list[str]] = field(default_factory=list)
    videos: dict[str, list[str]] = field(default_factory=dict)
    sample_inputs: list[list[Image.Image | None]] = field(default_factory=list, repr=False)

    def table_rows(self, digits: int = 3) -> list[list[str]]:
        """The table as text cells: a header (`model`, the columns, `Average`), then one row per model."""

        def fmt(value: float) -> str:
            return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"

        rows = [["model", *self.columns, "Average"]]
        for model in self.models:
            scores = [fmt(self.scores[model.label][column]) for column in self.columns]
            rows.append([model.label, *scores, fmt(self.average[model.label])])
        return rows

    def to_markdown(self, digits: int = 4) -> str:
        """The table: rows = models, columns = rewards, plus the Average of normalised scores."""

        def fmt(value: float) -> str:
            return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"

        header = ["model", "adapter", *self.columns, "Average"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        for model in self.models:
            adapter = f"`{model.source}`" if model.source else "–"
            if model.guidance_scale is not None:
                adapter += f" (guidance {model.guidance_scale:g})"
            cells = [model.label, adapter]
            cells += [fmt(self.scores[model.label][column]) for column in self.columns]
            cells.append(fmt(self.average[model.label]))
            lines.append("| " + " | ".join(cells) + " |")
        used = [c for c in self.columns if self.ranges.get(c)]
        ranges = ", ".join(f"{c} [{self.ranges[c][0]:g}, {self.ranges[c][1]:g}]" for c in used)
        s = self.settings
        notes = [
            "",
            f"Average: mean over columns of (score − low) / (high − low), with {ranges or 'no column'}"
            + (
                f"; left out (no range): {', '.join(c for c in self.columns if c not in used)}"
                if len(used) < len(self.columns)
                else ""
            )
            + ".",
            f"Sampling: {s.get('num_inference_steps')} steps ({sampler_name(s)}), guidance {s.get('guidance_scale')}, "
            + (format_resolution(s["resolution"]) if s.get("resolution") else "? px")
            + (f", {s['num_frames']} frames" if s.get("num_frames") else "")
            + (f", low-noise guidance {s['guidance_scale_2']}" if s.get("guidance_scale_2") is not None else "")
            + f", seed {s.get('seed')} (+ image index); prompts per column: "
            + ", ".join(f"{c} {n}" for c, n in s.get("prompts", {}).items())
            + ".",
        ]
        return "\n".join(lines + notes) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: nan becomes `null`."""
        return {
            "columns": self.columns,
            "rows": [
                {
                    "model": m.label,
                    "adapter": m.source,
                    "guidance_scale": m.guidance_scale,
                    "scores": {c: _finite(self.scores[m.label][c]) for c in self.columns},
                    "counts": self.counts[m.label],
                    "average": _finite(self.average[m.label]),
                    "grid": self.grids.get(m.label),
                    **({"videos": self.videos[m.label]} if m.label in self.videos else {}),
                }
                for m in self.models
            ],
            "ranges": {c: list(r) if r else None for c, r in self.ranges.items()},
            "settings": self.settings,
            "per_image": {
                label: {c: [_finite(v) for v in values] for c, values in columns.items()}
                for label, columns in self.per_image.items()
            },
        }

    def save(self, output_dir: str | os.PathLike) -> None:
        """Write `results.json` and `results.md` into `output_dir`."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULTS_JSON).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        (output_dir / RESULTS_MARKDOWN).write_text(self.to_markdown())


def _with_input(video: list[Image.Image], inputs: list[Image.Image | None]) -> list[Image.Image]:
    """`video`'s frames, after its input frame (`inputs[0]`, squashed to the video's size with Lanczos, as the
    pipeline's `video_processor` resizes it) when it has one: how an image-to-video sample is shown and written."""
    if not inputs or inputs[0] is None:
        return video
    return [inputs[0].convert("RGB").resize(video[0].size, Image.Resampling.LANCZOS), *video]


def _column_reward(column: str) -> str:
    return column.split("@", 1)[0]


@dataclass
class EvaluationConfig:
    """The settings of `evaluate_models` (the `eval` command's, `scripts.eval.DiffusionOPDEvalArguments`, map onto
    them): how every model samples, what is scored and what is written.

    Attributes:
        reward_kwargs: `{column or reward name: kwargs of get_reward}` (model ids, `device`, a server `url`, ...).
        include_base: Add the base model (all adapters off) as the first row, labelled `base_label`.
        num_inference_steps, guidance_scale, resolution: Sampling settings (an adapter's own `guidance_scale` wins).
        seed: Image i of a prompt set uses seed `seed + i`, for every model.
        batch_size: Images per pipeline call.
        max_prompts: Use only the first prompts of each set.
        max_sequence_length: T5 prompt length (`None`: the pipeline's default).
        num_frames: Frames per video (video pipelines; `None`: the pipeline's default).
        guidance_scale_2: CFG scale of Wan 2.2's low-noise expert (`None`: the pipeline's default, `guidance_scale`).
        family_kwargs: The family's own options, as in training (`generate_images`).
        video_format: `webp`, `gif` or `mp4` (see `figures.save_video`): the format of the sample videos.
        fps: Frames per second of the sample videos.
        max_grid_frames: Frames per video in the frame grids (spread evenly; `None`: all).
        grid_size: Images (videos) per prompt set in each model's grid.
        grid_image_size: Side of a grid tile in pixels (`None`: the generated size).
        normalization: `{column or reward name: [low, high]}` overriding the rewards' ranges for the Average.
        output_dir: Where `results.json`, `results.md` and `grids/<label>.png` go (a video pipeline: the frame grid,
            a row per video, and the first `grid_size` videos of every prompt set as `videos/<label>/<set>-<i>.<format>`;
            image-to-video rows: both with the row's input frame first); `None` writes nothing.
        cache_dir, token: Hub cache and token for adapters given as Hub ids.
        progress: Show a progress bar.
    """

    reward_kwargs: dict[str, dict[str, Any]] | None = None
    include_base: bool = True
    base_label: str = "base"
    num_inference_steps: int = 40
    guidance_scale: float = 4.5
    resolution: Resolution = 512
    seed: int = 0
    batch_size: int = 4
    max_prompts: int | None = None
    max_sequence_length: int | None = None
    num_frames: int | None = None
    guidance_scale_2: float | None = None
    family_kwargs: dict[str, Any] | None = None
    video_format: str = "webp"
    fps: int = 16
    max_grid_frames: int | None = 8
    grid_size: int = 8
    grid_image_size: int | None = 256
    normalization: dict[str, Sequence[float]] | None = None
    output_dir: str | os.PathLike | None = None
    cache_dir: str | None = None
    token: str | bool | None = None
    progress: bool = True


def evaluate_models(
    pipeline,
    prompts: dict[str, Any],
    adapters: dict[str, Any] | None = None,
    rewards: dict[str, Reward | Callable] | None = None,
    config: EvaluationConfig | None = None,
    **settings: Any,
) -> EvaluationResult:
    """Generate with the base and every adapter, score every column, write the table and one grid per model.

    Args:
        pipeline: The base diffusers pipeline, on its device.
        prompts: `{column: prompt source}`; a column is a reward name or `reward@label`.
        adapters: `{label: adapter spec}` (local folder, Hub id, or dict with `path`, `subfolder`, `revision`,
            `weight_name`, `guidance_scale`), in row order.
        rewards: `{column or reward name: Reward or function}` to use instead of the registry's.
        config: The settings (`EvaluationConfig`; `None`: its defaults).
        **settings: Fields of `EvaluationConfig` that replace `config`'s, e.g. `output_dir="eval"`,
            `num_inference_steps=10`.

    Raises:
        TypeError: a keyword argument that is not a field of `EvaluationConfig`.
    """
    config = dataclasses.replace(config or EvaluationConfig(), **settings)
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("`prompts` is empty: give {reward: prompt source}.")
    if config.video_format not in VIDEO_FORMATS:
        raise ValueError(f"`video_format` must be one of {', '.join(VIDEO_FORMATS)}, got {config.video_format!r}.")
    reward_kwargs = config.reward_kwargs or {}
    rewards = rewards or {}
    normalization = config.normalization or {}

    # Prompt sets: columns with identical prompts share their images.
    sets: list[tuple[list[dict], list[str]]] = []
    keys: dict[str, int] = {}
    for column, source in prompts.items():
        rows = load_prompt_source(source, f"prompts '{column}'")[: config.max_prompts]
        key = json.dumps(rows, sort_keys=True, default=str)
        if key not in keys:
            keys[key] = len(sets)
            sets.append((rows, []))
        sets[keys[key]][1].append(column)
    columns = list(prompts)

    scorers: dict[str, Reward] = {}
    for column in columns:
        name = _column_reward(column)
        given = rewards.get(column, rewards.get(name))
        kwargs = reward_kwargs.get(column, reward_kwargs.get(name, {}))
        scorers[column] = as_reward(given, name=name) if given is not None else get_reward(name, **kwargs)
    ranges = {}
    for column in columns:
        explicit = normalization.get(column, normalization.get(_column_reward(column)))
        ranges[column] = tuple(float(v) for v in explicit) if explicit else scorers[column].score_range

    models = [EvalModel(label=config.base_label)] if config.include_base else []
    for label, spec in (adapters or {}).items():
        models.append(load_adapter(pipeline, label, spec, cache_dir=config.cache_dir, token=config.token))
    experts = list(pipeline_experts(pipeline)) if adapters else []
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels) or len({_file_name(label) for label in labels}) != len(labels):
        raise ValueError(f"Model labels must be distinct (also as file names): {labels}.")
    if not models:
        raise ValueError("Nothing to evaluate: no adapter and `include_base=False`.")
    has_adapters = any(m.adapter_name for m in models)

    per_image = {m.label: {c: [] for c in columns} for m in models}
    grids: dict[str, str] = {}
    videos: dict[str, list[str]] = {}
    samples: dict[str, list[list[Image.Image]]] = {}
    set_inputs: dict[int, list] = {}  # per editing prompt set, the input image of each grid column
    total = len(models) * sum(len(rows) for rows, _ in sets)
    bar = tqdm(total=total, disable=not config.progress, desc="evaluating", unit="image")
    try:
        for model in models:
            _activate(pipeline, model, has_adapters, experts)
            scale = model.guidance_scale if model.guidance_scale is not None else config.guidance_scale
            grid_rows, tiles = [], []  # per prompt set its samples; the grid's rows (editing sets: inputs first)
            for rows, set_columns in sets:
                shown = []
                template = _set_template(model, set_columns)
                for start in range(0, len(rows), config.batch_size):
                    batch = rows[start : start + config.batch_size]
                    texts = [row["prompt"] for row in batch]
                    bar.set_postfix_str(model.label)
                    inputs = [row_images(row) for row in batch]
                    images = generate_images(
                        pipeline,
                        [template.format(prompt=text) for text in texts],
                        [config.seed + start + i for i in range(len(batch))],
                        config.num_inference_steps,
                        scale,
                        config.resolution,
                        config.max_sequence_length,
                        config.num_frames,
                        config.guidance_scale_2,
                        images=inputs,
                        family_kwargs=config.family_kwargs,
                    )
                    if any(inputs) and model is models[0]:  # the grids' input row: each row's first image
                        set_inputs.setdefault(id(rows), []).extend(
                            (row or [None])[0] for row in inputs[: max(0, config.grid_size - len(shown))]
                        )
                    for column in set_columns:
                        per_image[model.label][column].extend(scorers[column](images, texts, batch))
                    shown.extend(images[: max(0, config.grid_size - len(shown))])
                    bar.update(len(batch))
                if id(rows) in set_inputs:  # an editing set: its inputs above its outputs
                    tiles.append([blank_like(image, shown[0]) for image in set_inputs[id(rows)]])
                grid_rows.append(shown)
                tiles.append(shown)
            samples[model.label] = grid_rows
            if config.output_dir is not None:
                path = Path(config.output_dir) / GRIDS_DIR / f"{_file_name(model.label)}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                if any(is_video(sample) for shown in grid_rows for sample in shown):
                    captions = [
                        row["prompt"] for (rows, _), shown in zip(sets, grid_rows) for row in rows[: len(shown)]
                    ]
                    # image-to-video sets: each video shown and written with its input frame first
                    shown_videos = [
                        _with_input(video, (set_inputs.get(id(rows)) or [])[i : i + 1])
                        for (rows, _), shown in zip(sets, grid_rows)
                        for i, video in enumerate(shown)
                    ]
                    frame_grid(shown_videos, captions, config.max_grid_frames, config.grid_image_size).save(path)
                    folder = Path(config.output_dir) / VIDEOS_DIR / _file_name(model.label)
                    names = [f"{k}-{i}" for k, shown in enumerate(grid_rows) for i in range(len(shown))]
                    videos[model.label] = [
                        str(save_video(video, folder / f"{name}.{config.video_format}", config.fps))
                        for name, video in zip(names, shown_videos)
                    ]
                else:
                    make_grid(tiles, config.grid_image_size).save(path)
                grids[model.label] = str(path)
    finally:
        bar.close()  # an error then starts on its own line
        if has_adapters:
            pipeline.disable_lora()

    scores = {label: {c: nanmean(values) for c, values in cols.items()} for label, cols in per_image.items()}
    counts = {
        label: {c: sum(not math.isnan(v) for v in values) for c, values in cols.items()}
        for label, cols in per_image.items()
    }
    average = {}
    for label in labels:
        normalised = [
            (scores[label][c] - ranges[c][0]) / (ranges[c][1] - ranges[c][0]) for c in columns if ranges[c] is not None
        ]
        average[label] = nanmean(normalised) if normalised else math.nan
    settings = {
        "num_inference_steps": config.num_inference_steps,
        "scheduler": type(pipeline.scheduler).__name__,
        "guidance_scale": config.guidance_scale,
        "resolution": config.resolution,
        "seed": config.seed,
        "max_sequence_length": config.max_sequence_length,
        **({"num_frames": config.num_frames} if config.num_frames is not None else {}),
        **({"guidance_scale_2": config.guidance_scale_2} if config.guidance_scale_2 is not None else {}),
        "prompts": {c: len(rows) for rows, cols in sets for c in cols},
    }
    sample_prompts = [[row["prompt"] for row in rows[: config.grid_size]] for rows, _ in sets]
    sample_inputs = [set_inputs.get(id(rows), []) for rows, _ in sets]
    result = EvaluationResult(
        columns,
        models,
        scores,
        counts,
        per_image,
        ranges,
        average,
        grids,
        settings,
        samples,
        sample_prompts,
        videos,
        sample_inputs,
    )
    if config.output_dir is not None:
        result.save(config.output_dir)
    return result
