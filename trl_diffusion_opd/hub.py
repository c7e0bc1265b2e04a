"""The Hub side of a trained adapter: its model card (rendered from the package's Jinja template with
`huggingface_hub.ModelCard`) and the uploads of the trainers' `push_to_hub` (`DiffusionLoRATrainer`,
`FlowGRPOTrainer`, `DiffusionNFTTrainer`: every `DiffusionLoRATrainer`).

What goes to the Hub is an allow-list, never a whole folder: the student adapter
(`pytorch_lora_weights.safetensors`), the model card (`README.md`) and sample images (`samples/*.png`). The base
model, the teachers, the training arguments and the optimizer state stay local, unless `hub_strategy` is
`"checkpoint"` or `"all_checkpoints"`, which asks for resumable checkpoints on the Hub.

The card links only to pages that exist (the papers on arXiv, TRL, diffusers, PEFT, the base's and teachers' Hub
pages) and never shows a path of the training machine: local models appear by the names of `model_reference`.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import platform
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from . import registry
from .evaluation import SAMPLES_DIR, sampler_name
from .lora_io import DIFFUSERS_LORA_WEIGHTS, EXPERT_LORA_PATTERN, expert_weight_name
from .sizes import format_resolution, image_size


if TYPE_CHECKING:
    from .teachers import TeacherSpec

# The trainers call this module (it never imports them): `trainer` arguments are `DiffusionLoRATrainer`s.
DiffusionLoRATrainer = Any

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
CARD_NAME = "README.md"
# Files of `output_dir` that `push_to_hub` uploads; everything else stays local. `EXPERT_LORA_PATTERN`: the LoRAs of
# a multi-expert student's further experts (Wan 2.2: `pytorch_lora_weights_transformer_2.safetensors`).
# Sample videos of the video families (`RewardEvalCallback`): animated WebP / GIF (shown inline) or MP4.
SAMPLE_SUFFIXES = (".png", ".webp", ".gif", ".mp4")
UPLOAD_PATTERNS = [
    DIFFUSERS_LORA_WEIGHTS,
    EXPERT_LORA_PATTERN,
    CARD_NAME,
    *(f"{SAMPLES_DIR}/*{suffix}" for suffix in SAMPLE_SUFFIXES),
]

TRL_CITATION = """@software{vonwerra2020trl,
    title   = {{TRL: Transformers Reinforcement Learning}},
    author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
    license = {Apache-2.0},
    url     = {https://github.com/huggingface/trl},
    year    = {2020}
}"""


def _license(name: str, license_name: str | None = None, base: str | None = None) -> dict[str, str]:
    data = {"license": name}
    if license_name:
        data["license_name"] = license_name
        data["license_link"] = f"https://huggingface.co/{base}/blob/main/LICENSE.md"
    return data


# Licenses of well-known bases, used before (and instead of) reading the base's own card, which may be offline.
# An adapter inherits its base's terms, so the card links to the base's licence file.
KNOWN_LICENSES = {
    base: _license("other", "stabilityai-ai-community", base)
    for base in (
        "stabilityai/stable-diffusion-3.5-medium",
        "stabilityai/stable-diffusion-3.5-large",
        "stabilityai/stable-diffusion-3.5-large-turbo",
        "stabilityai/stable-diffusion-3-medium-diffusers",
    )
}
KNOWN_LICENSES["black-forest-labs/FLUX.1-dev"] = _license(
    "other", "flux-1-dev-non-commercial-license", "black-forest-labs/FLUX.1-dev"
)
KNOWN_LICENSES["black-forest-labs/FLUX.1-schnell"] = _license("apache-2.0")
# Checked in 2026-12 against copies of the Hub cards (the Hub itself was not reachable): the klein 4B cards (base
# and distilled) carry `license: apache-2.0`; the klein-9B card `license: other`, `license_name:
# flux-non-commercial-license` with LICENSE.md (FLUX Non-Commercial License v2.1), and klein-base-9B derivatives
# declare the same. Qwen/Qwen-Image: Apache-2.0 per NVIDIA's model card for it and the repo's 11.3 kB LICENSE file;
# its card's front matter itself was not seen.
KNOWN_LICENSES["black-forest-labs/FLUX.2-klein-4B"] = _license("apache-2.0")
KNOWN_LICENSES["black-forest-labs/FLUX.2-klein-base-4B"] = _license("apache-2.0")
for _klein_9b in ("black-forest-labs/FLUX.2-klein-9B", "black-forest-labs/FLUX.2-klein-base-9B"):
    KNOWN_LICENSES[_klein_9b] = _license("other", "flux-non-commercial-license", _klein_9b)
KNOWN_LICENSES["Qwen/Qwen-Image"] = _license("apache-2.0")

PACKAGES = (
    "trl-diffusion-opd",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "torch",
    "datasets",
    "bitsandbytes",
    "huggingface_hub",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that matter for reproducing a run (`"not installed"` when missing)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def is_hub_id(name: str | os.PathLike | None) -> bool:
    """Whether `name` reads as a Hub repo id (`owner/name`) rather than a local path."""
    if isinstance(name, os.PathLike):
        return False
    return bool(name) and _HUB_ID.match(name) is not None and not os.path.exists(name)


@functools.lru_cache(maxsize=32)
def base_license(base: str | None) -> dict[str, str]:
    """Licence metadata (`license`, and `license_name` / `license_link` for custom licences) of a base model.

    Well-known bases come from `KNOWN_LICENSES`; others from the base's own model card (a local `README.md`, or the
    Hub's, which honours `HF_HUB_OFFLINE`). Empty when unknown.
    """
    if not base:
        return {}
    if base in KNOWN_LICENSES:
        return dict(KNOWN_LICENSES[base])
    try:
        local = Path(base) / CARD_NAME
        card = ModelCard.load(local if local.is_file() else base, ignore_metadata_errors=True)
    except Exception:  # an unreachable or card-less base simply has no known licence
        return {}
    data = card.data.to_dict()
    result = {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}
    link = result.get("license_link")
    if link and "://" not in link and is_hub_id(base):
        result["license_link"] = f"https://huggingface.co/{base}/blob/main/{link}"
    return result if "license" in result else {}


_REGISTERED_NOTE = "a name registered with `trl_diffusion_opd.registry` by a plug-in"
# Hub cache folders are `models--owner--name/snapshots/<commit>/...`.
_CACHE_REPO = re.compile(r"^models--(?P<owner>[^-].*?)--(?P<name>.+)$")


@dataclass(frozen=True)
class ModelReference:
    """How a model card names a base or an adapter: never by the machine's absolute path.

    Attributes:
        name: What the card prints: a Hub id (`owner/name[/sub/folder][@revision]`), a registered name
            (`world:base`, `world:<task>`, `tiny:sd3`: `trl_diffusion_opd.registry`), a local folder's name, or
            `"unknown"`.
        kind: `"hub"` (a Hub id), `"hub-cache"` (a folder of the local Hub cache: a copy of a Hub repo),
            `"registered"` (a name a plug-in registered), `"local"` (another local folder), `"memory"` (a pipeline
            built in memory: `name` is its class, `pipeline_reference`) or `"unknown"`.
        hub_id: `owner/name` for `"hub"` and `"hub-cache"`, else `None`.
        note: A plain statement of where the model came from when it was not a Hub repo (empty for Hub ids).
    """

    name: str
    kind: str
    hub_id: str | None = None
    note: str = ""

    @property
    def url(self) -> str | None:
        """The Hub page of the repo, when there is one."""
        return f"https://huggingface.co/{self.hub_id}" if self.hub_id else None

    def markdown(self) -> str:
        """The name in code style, linked to its Hub page when it has one."""
        return f"[`{self.name}`]({self.url})" if self.url else f"`{self.name}`"


def model_reference(
    source: str | os.PathLike | None, subfolder: str | None = None, revision: str | None = None
) -> ModelReference:
    """Name `source` (a Hub id, a local folder, or a registered name such as `world:base`) for a model card.

    Local folders never appear by their path: a folder of the Hub cache (`.../models--owner--name/snapshots/<commit>/sub`) becomes the Hub id it
    was downloaded from (`owner/name/sub@<commit>`), any other folder its own name.

    Args:
        source: The model's id or folder (`None` when unknown).
        subfolder: Folder inside `source` that holds the model.
        revision: Hub revision asked for.
    """
    if source is None or str(source) == "":
        return ModelReference("unknown", "unknown", note="not recorded")
    text = os.fspath(source)
    suffix = (f"/{subfolder.strip('/')}" if subfolder else "") + (f"@{revision}" if revision else "")
    named = registry.get_pipeline(text)
    if named is not None:
        return ModelReference(text, "registered", note=named.description or _REGISTERED_NOTE)
    if is_hub_id(source):
        return ModelReference(text + suffix, "hub", hub_id=text)
    folder = Path(text).expanduser()
    folder = (folder / subfolder) if subfolder else folder
    resolved = folder.resolve()
    parts = resolved.parts
    for index in range(len(parts) - 2):
        match = _CACHE_REPO.match(parts[index])
        if match and parts[index + 1] == "snapshots" and _COMMIT.match(parts[index + 2]):
            hub_id = f"{match['owner']}/{match['name']}"
            inner = "/".join(parts[index + 3 :])
            commit = parts[index + 2]
            name = hub_id + (f"/{inner}" if inner else "") + f"@{commit}"
            return ModelReference(name, "hub-cache", hub_id=hub_id, note="loaded from a local copy of the Hub repo")
    name = Path(text).expanduser().name or resolved.name
    return ModelReference(
        name + (f"/{subfolder.strip('/')}" if subfolder else ""), "local", note="a local folder, not on the Hub"
    )


def pipeline_reference(pipeline: Any) -> ModelReference:
    """The card's name of a base passed as a pipeline that records no Hub id or folder (`name_or_path`): its class,
    with how it was built when that was recorded (`registry.record_built_pipeline`, as the tiny pipelines of
    `trl_diffusion_opd.testing` do)."""
    built = registry.built_pipeline(pipeline)
    note = built[0] if built else "a pipeline built in memory; no Hub id or folder was recorded"
    return ModelReference(type(pipeline).__name__, "memory", note=note)


def teacher_reference(spec: TeacherSpec) -> ModelReference:
    """The card's name of a teacher: `id[/sub/folder]@revision` for a Hub teacher (the resolved commit when no
    revision was asked for), or the path-free name of a local one (see `model_reference`)."""
    if spec.module is not None:
        return ModelReference(spec.path, "local", note="a model passed in memory")
    if spec.alias is not None:  # a registered name (`world:letters`): shown as the user wrote it
        name = spec.display
        return ModelReference(name, "registered", note=registry.teacher_description(name) or _REGISTERED_NOTE)
    if spec.is_local:
        return model_reference(spec.path, spec.subfolder)
    if is_hub_id(spec.path) or _HUB_ID.match(spec.path):
        revision = spec.revision
        if revision is None and spec.local_dir is not None:
            parts = Path(spec.local_dir).parts
            if "snapshots" in parts:
                index = parts.index("snapshots")
                if index + 1 < len(parts) and _COMMIT.match(parts[index + 1]):
                    revision = parts[index + 1]
        return ModelReference(spec.display.split("@")[0] + (f"@{revision}" if revision else ""), "hub", spec.path)
    return model_reference(spec.path, spec.subfolder, spec.revision)


def sample_widgets(trainer: DiffusionLoRATrainer) -> list[dict[str, str]]:
    """Widget entries `{"text": prompt, "url": "samples/<file>"}` for the card (images, or videos: `.webp`, `.gif`,
    `.mp4`).

    `trainer.sample_widgets` wins when the trainer recorded its samples with their prompts; otherwise every
    `output_dir/samples/*` of those suffixes is listed, its file name standing in for the prompt.
    """
    recorded = getattr(trainer, "sample_widgets", None)
    if recorded:
        return [{"text": str(item["text"]), "url": str(item["url"])} for item in recorded]
    folder = Path(trainer.args.output_dir) / SAMPLES_DIR
    if not folder.is_dir():
        return []
    return [
        {"text": path.stem.replace("_", " "), "url": f"{SAMPLES_DIR}/{path.name}"}
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in SAMPLE_SUFFIXES
    ]


def _example_prompt(trainer: DiffusionLoRATrainer) -> str:
    """A prompt of the training data for the card's quick start (what the adapter was trained on)."""
    for rows in (getattr(trainer, "task_prompts", None) or {}).values():
        for row in rows:
            return str(row["prompt"])
    return 'A photo of a cat holding a sign that says "hello"'


class _Code(str):
    """Python source shown as is in the quick start (its `repr` is itself)."""

    def __repr__(self) -> str:
        return str(self)


def _example_image_kwargs(trainer: DiffusionLoRATrainer) -> dict[str, str]:
    """The quick start's image arguments when the example row has input images (editing): the family's
    `pipeline_image_kwargs` with `load_image("<file name>")` for each image (never a path of the machine)."""
    for rows in (getattr(trainer, "task_prompts", None) or {}).values():
        for row in rows:
            images = row.get("image") or []
            if not images:
                return {}
            names = [
                os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else f"input-{k + 1}.png"
                for k, image in enumerate(images)
            ]
            loads = [_Code(f"load_image({name!r})") for name in names]
            kwargs = trainer.family.pipeline_image_kwargs(loads, trainer.args.resolution)
            return {key: repr(value) for key, value in kwargs.items()}
    return {}


def _spec_reference(spec: Any) -> ModelReference:
    """The card's name of an adapter given as a teacher-style spec (`owner/repo/sub@rev`, a folder, a dict)."""
    from .teachers import parse_teacher_spec

    try:
        return teacher_reference(parse_teacher_spec("adapter", spec))
    except (ValueError, TypeError):
        return model_reference(spec.get("path") if isinstance(spec, dict) else spec)


def _base_loader(ref: ModelReference, pipeline: Any = None) -> str:
    """The quick start's lines that load the base as `pipe` (on `device`), imports first."""
    named = registry.get_pipeline(ref.name) if ref.kind == "registered" else None
    if named is not None and named.quickstart:
        return (
            f"{named.quickstart}\n\n"
            'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
            f"pipe = pipe.to(device)  # `{ref.name}`: {named.description or _REGISTERED_NOTE}"
        )
    if ref.kind == "memory":
        built = registry.built_pipeline(pipeline) if pipeline is not None else None
        if built is not None and built[1]:
            return f'{built[1]}\n\ndevice = "cuda" if torch.cuda.is_available() else "cpu"\npipe = pipe.to(device)'
        return (
            f"from diffusers import {ref.name}\n\n"
            'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
            f"# The base was a {ref.name} built in memory, with no Hub id or folder recorded: load the same weights.\n"
            f'pipe = {ref.name}.from_pretrained("<the base model>", torch_dtype=torch.bfloat16).to(device)'
        )
    name, comment = ref.hub_id or ref.name, ""
    if ref.kind == "local":
        comment = f"# The base was a local folder ({ref.name!r}), not on the Hub: point this at your copy of it.\n"
    # a base run as another pipeline class (`pipeline_class`: TI2V-5B as `WanImageToVideoPipeline`) is re-wrapped so
    if pipeline is not None and getattr(pipeline, registry.LOADED_AS, None):
        klass = type(pipeline).__name__
        return (
            f"from diffusers import DiffusionPipeline, {klass}\n\n"
            'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
            f'{comment}pipe = DiffusionPipeline.from_pretrained("{name}", torch_dtype=torch.bfloat16)\n'
            f"pipe = {klass}.from_pipe(pipe).to(device)  # run as {klass}, as it was trained"
        )
    return (
        "from diffusers import DiffusionPipeline\n\n"
        'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
        f'{comment}pipe = DiffusionPipeline.from_pretrained("{name}", torch_dtype=torch.bfloat16).to(device)'
    )


def _adapter_location(output_dir: str | os.PathLike, hub_id: str | None) -> tuple[str, str]:
    """Where the quick start loads the adapter from, and a comment line for it: the Hub id once there is one (the
    card is written again when it is pushed); before, the output folder as it was given when that is a relative path
    inside the folder training ran in, else only its name (the card never shows a path of the machine)."""
    if hub_id:
        return hub_id, ""
    given = Path(output_dir)
    name = given.name or Path(output_dir).resolve().name
    if not given.is_absolute() and ".." not in given.parts and not str(output_dir).startswith("~"):
        folder = given.as_posix()
        return folder, "# Not pushed to the Hub: the folder of this card, relative to the folder training ran in."
    return name, f"# Not pushed to the Hub: give the path of the folder of this card, `{name}`."


def _cell(value: Any, digits: int = 4) -> str:
    """A markdown table cell: floats with `digits` decimals, `–` when missing or NaN, no `|` or line break."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: list[str], rows: list[list[Any]], text_columns: int = 1) -> str:
    """A markdown table; the columns after the first `text_columns` are numbers, right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _evaluation_section(results: Any, trainer: DiffusionLoRATrainer) -> dict[str, str]:
    """The card's section of an external results table: an `EvaluationResult` of `evaluation.evaluate_models`
    (base vs adapters, e.g. the world demo's base vs teachers vs student) or its `to_dict()` (`results.json`)."""
    table = results.to_dict() if hasattr(results, "to_dict") else dict(results)
    columns, settings = list(table["columns"]), table.get("settings") or {}
    own = Path(trainer.args.output_dir).resolve()
    with_average = any(row.get("average") is not None for row in table["rows"])
    rows = []
    for row in table["rows"]:
        adapter = row.get("adapter")
        if adapter is None:
            name = "– (the base)"
        elif isinstance(adapter, str) and not is_hub_id(adapter) and Path(adapter).expanduser().resolve() == own:
            name = "this adapter"
        else:
            name = _spec_reference(adapter).markdown()
        if row.get("guidance_scale") is not None:
            name += f" (guidance {row['guidance_scale']:g})"
        scores = [row["scores"].get(column) for column in columns]
        rows.append([row["model"], name, *scores, *([row.get("average")] if with_average else [])])
    header = ["model", "adapter", *columns, *(["Average"] if with_average else [])]
    prompts = settings.get("prompts") or {}
    counts = ", ".join(f"{column}: {count}" for column, count in prompts.items())
    description = (
        "Mean reward of each model per column (reward), scored by `trl_diffusion_opd.evaluation.evaluate_models` on "
        f"one image per prompt ({counts or 'prompt counts not recorded'} prompts). Every model is sampled with the same "
        f"initial noise (seed {settings.get('seed', 'not recorded')} + image index), "
        f"{settings.get('num_inference_steps', '?')} {sampler_name(settings)} steps, guidance "
        f"{settings.get('guidance_scale', '?')} (unless a row says otherwise), "
        + (format_resolution(settings["resolution"]) if settings.get("resolution") else "? px")
        + (f", {settings['num_frames']} frames" if settings.get("num_frames") else "")
        + "."
    )
    ranges = {column: bounds for column, bounds in (table.get("ranges") or {}).items() if bounds}
    if with_average and ranges:
        spans = ", ".join(f"{column} [{low:g}, {high:g}]" for column, (low, high) in ranges.items())
        description += f" Average: the mean over columns of (score − low) / (high − low), with {spans}."
    return {"title": "Evaluation", "description": description, "table": _markdown_table(header, rows, 2)}


_EVAL_REWARD_KEY = re.compile(r"^rewards/(?P<task>[^/]+)/(?P<reward>.+)$")


def _reward_eval_section(trainer: DiffusionLoRATrainer) -> dict[str, str] | None:
    """The card's section of the rewards `RewardEvalCallback` logged during training (`rewards/{task}/{reward}` in
    the log history): the first and the last evaluation, per task and reward."""
    evaluations = [e for e in trainer.state.log_history if any(_EVAL_REWARD_KEY.match(k) for k in e)]
    if not evaluations:
        return None
    keys = list(dict.fromkeys(k for e in evaluations for k in e if _EVAL_REWARD_KEY.match(k)))
    shown = [evaluations[0], evaluations[-1]] if len(evaluations) > 1 else evaluations
    header = ["task", "reward", *(f"step {e.get('step', '?')}" for e in shown)]
    rows = [[*_EVAL_REWARD_KEY.match(k).group("task", "reward"), *(e.get(k) for e in shown)] for k in keys]
    args = trainer.args
    callback = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "RewardEvalCallback"), None)
    weights = "its EMA weights" if args.ema else "its weights"
    if callback is not None and getattr(callback, "prompts", None):
        held_out = trainer.eval_prompts or {}
        counts = ", ".join(
            f"{task}: {len(rows)}"
            + ("" if callback.prompts_spec is not None else (" held-out" if held_out.get(task) else " training"))
            for task, rows in callback.prompts.items()
        )
        steps = callback.num_inference_steps or args.num_inference_steps
        sampling = (
            f"the same fixed prompts at every evaluation ({counts} prompts per task, one image each), "
            f"sampled with {steps} steps, guidance {args.guidance_scale} and the same initial noise (seed "
            f"{callback.seed})"
        )
    else:
        sampling = "fixed prompts per task (their number and seed were not recorded with this card)"
    description = (
        f"Mean reward of the student ({weights}) during training, measured by `RewardEvalCallback` on {sampling}; "
        f"{len(evaluations)} evaluation{'s' if len(evaluations) != 1 else ''}, "
        + ("the first and the last shown." if len(shown) > 1 else "shown.")
    )
    return {"title": "Rewards during training", "description": description, "table": _markdown_table(header, rows, 2)}


def _kl_eval_section(trainer: DiffusionLoRATrainer) -> dict[str, str] | None:
    """The card's section of the last `trainer.evaluate()` (`eval_kl` and `eval_kl/{task}` in the log history)."""
    entry = next((e for e in reversed(trainer.state.log_history) if "eval_kl" in e), None)
    if entry is None:
        return None
    tasks = [key.split("/", 1)[1] for key in entry if key.startswith("eval_kl/")]
    rows = [[task, entry[f"eval_kl/{task}"]] for task in tasks] + [["mean over tasks", entry["eval_kl"]]]
    held_out = trainer.eval_prompts or {}
    counts = ", ".join(f"{task}: {len(held_out[task])}" for task in tasks if task in held_out)
    prompts = f"held-out prompts ({counts})" if counts else "the prompts given to `evaluate()`"
    compute = getattr(trainer, "compute_teacher_kl", None)
    seed = inspect.signature(compute).parameters["seed"].default if compute is not None else "not recorded"
    normalization = getattr(trainer.args, "kl_normalization", None)
    description = (
        "Mean per-step KL between the student's and its task's teacher's next-step Gaussians"
        + (f" ({normalization} normalisation)" if normalization else "")
        + f", on the student's own rollouts of {prompts}, {trainer.args.num_inference_steps} sampler steps, "
        f"seed {seed}; measured by `trainer.evaluate()` at step {entry.get('step', '?')}. Lower is closer to the "
        "teacher."
    )
    return {"title": "KL to the teachers", "description": description, "table": _markdown_table(["task", "KL"], rows)}


def result_sections(trainer: DiffusionLoRATrainer, results: Any = None) -> list[dict[str, str]]:
    """The card's results: `results` (or `trainer.model_card_results`), an `EvaluationResult` or its `to_dict()`,
    then what the run logged itself: `RewardEvalCallback`'s rewards and the last `evaluate()`'s KL.

    Returns:
        `[{"title", "description", "table"}]`, the table in markdown; empty when nothing was measured.
    """
    results = results if results is not None else getattr(trainer, "model_card_results", None)
    sections = [_evaluation_section(results, trainer)] if results is not None else []
    sections += [s for s in (_reward_eval_section(trainer), _kl_eval_section(trainer)) if s is not None]
    return sections


def create_model_card(
    trainer: DiffusionLoRATrainer,
    model_name: str | None = None,
    dataset_name: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    samples: list[dict] | None = None,
    results: Any = None,
) -> ModelCard:
    """Render the model card of `trainer`'s student adapter.

    What is specific to the algorithm comes from `trainer._model_card_details()`: the summary sentence (which
    algorithm, which teachers or rewards), the teachers' and rewards' tables, extra tags (tasks, reward names), the
    algorithm's rows of the training table and the papers to cite (`trainer._name`, `trainer._paper`).

    The card never shows a path of the machine: local bases, teachers and adapters appear by the names of
    `model_reference` (`world:base`, `tiny:sd3`, the Hub id of a Hub-cache folder, a folder's name) with a statement
    that they were local, and the quick start loads the base the way a reader can.

    Args:
        trainer: The trainer whose config, base and algorithm describe the adapter.
        model_name: Title of the card; defaults to the last part of `hub_model_id` or of `output_dir`.
        dataset_name: Hub dataset id(s) of the prompts, recorded in the metadata.
        tags: Extra tags.
        samples: Widget entries `{"text": prompt, "url": path in the repo}`; defaults to `sample_widgets(trainer)`.
        results: A results table for the card's Results section: an `EvaluationResult` of
            `evaluation.evaluate_models` (e.g. base vs teachers vs student) or its `to_dict()`; defaults to
            `trainer.model_card_results` when set. The rewards of `RewardEvalCallback` and the KL of the last
            `evaluate()` are added from the log history either way.
    """
    args = trainer.args
    pipeline = getattr(trainer, "pipeline", None)
    if trainer.base_model_id is None and pipeline is not None:
        base = pipeline_reference(pipeline)
    else:
        base = model_reference(trainer.base_model_id)
    hub_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    repo_id = hub_id or Path(args.output_dir).name
    adapter, adapter_comment = _adapter_location(args.output_dir, hub_id)
    details = trainer._model_card_details()
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    all_tags = list(dict.fromkeys([*trainer.model_tags, *details.get("tags", []), *extra_tags]))
    datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    samples = samples if samples is not None else sample_widgets(trainer)
    card_data = ModelCardData(
        base_model=base.hub_id,
        base_model_relation="adapter" if base.hub_id else None,
        library_name="diffusers",
        pipeline_tag=trainer.family.pipeline_tag,
        tags=all_tags,
        datasets=[name for name in datasets if is_hub_id(name)] or None,
        widget=[{"text": s["text"], "output": {"url": s["url"]}} for s in samples] or None,
        **(base_license(base.hub_id) if base.hub_id else {}),
    )
    peft_config = trainer.peft_config
    targets = peft_config.target_modules or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    sampler = "ODE (deterministic)" if args.noise_level == 0 else f"{args.sde_type.upper()} (stochastic)"
    settings = {
        "algorithm": trainer._name,
        "sampler": sampler,
        "sampler steps (trained steps)": f"{args.num_inference_steps} ({args.num_train_timesteps})",
        "noise level": args.noise_level,
        "student CFG scale": args.guidance_scale,
        "resolution": format_resolution(args.resolution),
        **details.get("settings", {}),
        "LoRA rank / alpha": f"{peft_config.r} / {peft_config.lora_alpha}",
        "LoRA targets": ", ".join(targets),
        "learning rate": args.learning_rate,
        details.get("steps_label", "optimizer steps"): trainer.state.global_step,
        "EMA": f"decay {args.ema_decay}, every {args.ema_update_interval} steps" if args.ema else "off",
        "seed": args.seed,
    }
    if args.student_adapter:
        continued = _spec_reference(args.student_adapter)
        settings["continued from"] = continued.markdown() + (f" ({continued.note})" if continued.note else "")
    teachers = []
    for row in details.get("teachers", []):
        reference = row.get("reference")
        if isinstance(reference, ModelReference):
            where = f"[Hub]({reference.url})" if reference.url else ""
            where = "; ".join(part for part in (where, reference.note) if part) or "–"
            row = {**row, "source": reference.name, "where": where}
        teachers.append(row)
    papers = [paper for paper in details.get("papers", [trainer._paper]) if paper]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name or repo_id.split("/")[-1],
        adapter=adapter,
        adapter_comment=adapter_comment,
        base=base,
        base_loader=_base_loader(base, pipeline),
        algorithm=trainer._name,
        summary=details.get("summary", f"trained with **{trainer._name}**."),
        papers=papers,
        trl_citation=TRL_CITATION,
        teachers=teachers,
        rewards=details.get("rewards", []),
        results=result_sections(trainer, results),
        guidance_kwargs={
            key: repr(value)
            for key, value in trainer.family.pipeline_guidance_kwargs(
                args.guidance_scale, args.negative_prompt
            ).items()
        },
        example_prompt=repr(_example_prompt(trainer)),
        image_kwargs=_example_image_kwargs(trainer),
        num_inference_steps=args.num_inference_steps,
        height=image_size(args.resolution)[0],
        width=image_size(args.resolution)[1],
        # only where the pipeline's `__call__` takes it (Qwen-Image-2.1's does not truncate prompts)
        max_sequence_length=args.max_sequence_length if _call_takes(pipeline, "max_sequence_length") else None,
        extra_experts=[
            {"component": name, "weight_name": expert_weight_name(name)} for name in list(trainer.family.experts)[1:]
        ],
        video=trainer.family.pipeline_tag in ("text-to-video", "image-to-video"),
        num_frames=trainer.family.num_frames,
        guidance_scale_2=args.guidance_scale_2,
        settings=settings,
        samples=samples,
        versions=package_versions(),
    )


def _call_takes(pipeline: Any, argument: str) -> bool:
    """Whether `pipeline`'s `__call__` has the keyword `argument` (`True` without a pipeline)."""
    if pipeline is None:
        return True
    return argument in inspect.signature(type(pipeline).__call__).parameters


def _hf_api():
    # The Trainer's shared client, so that uploads carry transformers' library info like the Trainer's own.
    from transformers.utils.hub import hf_api

    return hf_api()


def push_to_hub(
    trainer: DiffusionLoRATrainer,
    commit_message: str | None = "End of training",
    blocking: bool = True,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    **card_kwargs: Any,
):
    """Save the student adapter and its card into `output_dir`, then upload the allow-listed files to
    `trainer.hub_model_id` (created from `hub_model_id` / `output_dir` and `hub_private_repo` when needed).

    Args:
        trainer: The trainer.
        commit_message: Message of the commit.
        blocking: Wait for the upload; `False` returns a `Future`.
        token: Token with write access; defaults to `args.hub_token`.
        revision: Branch to push to; defaults to `args.hub_revision`.
        private: Visibility of a newly created repo; defaults to `args.hub_private_repo`.
        card_kwargs: `model_name`, `dataset_name`, `tags` for the card.

    Returns:
        The `CommitInfo` of the upload (a `Future` when `blocking=False`); `None` on processes other than the first.
    """
    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    token = token if token is not None else args.hub_token
    if trainer.hub_model_id is None:
        trainer.init_hf_repo(token=token, private=private)
    trainer.save_model(_internal_call=True)  # every process: saving may need collective operations
    if not trainer.is_world_process_zero():
        return None
    trainer.create_model_card(**card_kwargs)
    trainer._finish_current_push()
    return _hf_api().upload_folder(
        repo_id=trainer.hub_model_id,
        folder_path=args.output_dir,
        allow_patterns=UPLOAD_PATTERNS,
        commit_message=commit_message,
        token=token,
        run_as_future=not blocking,
        revision=revision if revision is not None else args.hub_revision,
    )


def push_checkpoint(trainer: DiffusionLoRATrainer, checkpoint_folder: str | os.PathLike) -> None:
    """Hub side of a checkpoint save, following `args.hub_strategy` (the body of the trainer's
    `_push_from_checkpoint`).

    `"every_save"`: the checkpoint's adapter and card are copied into `output_dir` and the allow-listed files are
    uploaded. `"checkpoint"` / `"all_checkpoints"` also upload the whole checkpoint folder (optimizer state
    included, so training can resume from the Hub) as `last-checkpoint/` or `checkpoint-N/`. `"end"` pushes nothing
    until `push_to_hub`. Uploads run in the background; a save while the previous push runs is skipped unless
    `hub_always_push`.
    """
    from transformers.trainer_utils import HubStrategy
    from transformers.utils.hub import PushInProgress

    args = trainer.args
    if not trainer.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
        return
    in_progress = getattr(trainer, "push_in_progress", None)
    if not args.hub_always_push and in_progress is not None and not in_progress.is_done():
        return
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    checkpoint_folder = Path(checkpoint_folder)
    for path in [
        checkpoint_folder / DIFFUSERS_LORA_WEIGHTS,
        *checkpoint_folder.glob(EXPERT_LORA_PATTERN),
        checkpoint_folder / CARD_NAME,
    ]:
        if path.is_file():
            shutil.copy(path, Path(args.output_dir) / path.name)
    message = f"Training in progress, step {trainer.state.global_step}"
    jobs = [
        _hf_api().upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=args.output_dir,
            allow_patterns=UPLOAD_PATTERNS,
            commit_message=message,
            token=args.hub_token,
            run_as_future=True,
            revision=args.hub_revision,
        )
    ]
    if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        path_in_repo = "last-checkpoint" if args.hub_strategy == HubStrategy.CHECKPOINT else checkpoint_folder.name
        jobs.append(
            _hf_api().upload_folder(
                repo_id=trainer.hub_model_id,
                folder_path=str(checkpoint_folder),
                path_in_repo=path_in_repo,
                commit_message=f"{message}, checkpoint",
                token=args.hub_token,
                run_as_future=True,
                revision=args.hub_revision,
            )
        )
    if in_progress is None or in_progress.is_done():
        trainer.push_in_progress = PushInProgress(jobs)
    else:
        in_progress.jobs.extend(jobs)


MERGE_TEMPLATE = Path(__file__).parent / "templates" / "merge_model_card.md"


def create_merge_card(
    merged: Any, pipeline: Any, base: str | None, output_dir: str | os.PathLike, model_name: str | None = None
) -> ModelCard:
    """The model card of a merged adapter (`merging.MergedAdapter`): the base, the merged adapters with their
    weights and sources (path-free names, as `create_model_card` shows teachers), the combination and its settings,
    and the quick start. `base` names the base (a Hub id, a folder or a registered name; `None`: the pipeline's
    class)."""
    from .families.base import get_family

    reference = model_reference(base) if base else pipeline_reference(pipeline)
    family = get_family(pipeline)
    adapter, adapter_comment = _adapter_location(output_dir, None)
    sources = []
    for label, spec in merged.sources.items():
        ref = teacher_reference(spec)
        where = "; ".join(part for part in (f"[Hub]({ref.url})" if ref.url else "", ref.note) if part)
        sources.append({"label": label, "source": ref.name, "weight": merged.weights[label], "where": where})
    first = next(iter(merged.configs.values()))
    targets = first.target_modules or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    settings = {
        "combination type": f"`{merged.combination_type}`",
        "LoRA rank / alpha": " ; ".join(f"{e}: {c.r} / {c.lora_alpha}" for e, c in merged.configs.items()),
        "LoRA targets": ", ".join(targets),
    }
    if merged.density is not None:
        settings["density"] = merged.density
    if merged.svd_rank is not None:
        settings["svd rank"] = merged.svd_rank
    if "ties" in merged.combination_type:
        settings["majority sign method"] = merged.majority_sign_method
    if "dare" in merged.combination_type:
        settings["seed (DARE's random drop)"] = merged.seed
    card_data = ModelCardData(
        base_model=reference.hub_id,
        base_model_relation="adapter" if reference.hub_id else None,
        library_name="diffusers",
        pipeline_tag=family.pipeline_tag,
        tags=["trl-diffusion-opd", "lora", "merge", family.tag],
        **(base_license(reference.hub_id) if reference.hub_id else {}),
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(MERGE_TEMPLATE),
        model_name=model_name or Path(output_dir).resolve().name,
        base=reference,
        base_loader=_base_loader(reference, pipeline),
        adapter=adapter,
        adapter_comment=adapter_comment,
        extra_experts=[
            {"component": name, "weight_name": expert_weight_name(name)}
            for name in merged.state_dicts
            if name != "transformer"
        ],
        combination_type=merged.combination_type,
        meaning=merged.meaning,
        sources=sources,
        settings=settings,
        versions=package_versions(),
    )
