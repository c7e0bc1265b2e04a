"""Teacher specifications, their resolution (local folder or Hub) and loading as adapters on the shared base.

LoRA teachers run on the one frozen transformer that also carries the student, so N teachers cost one copy of the base
plus their LoRA weights: the trainer keeps them in a `teacher_bank.TeacherBank` (flat tensors behind a few shared
adapters); `load_lora_teacher` loads one as a PEFT adapter of its own (evaluation, scripts). `AdapterSwitch` activates
one adapter (or a bank teacher) for a forward pass and restores the student afterwards.

Accepted spec forms (strings in Python, YAML and on the command line):

- `./path/to/folder` or `/abs/path` — a local folder;
- `owner/repo`, `owner/repo@revision` — a Hub repo;
- `owner/repo/sub/folder`, `owner/repo/sub/folder@revision` — a subfolder of a Hub repo (e.g. the released
  `quanhaol/DiffusionOPD/OCRTeacher/lora`);
- a dict with `path` and optional `subfolder`, `revision`, `guidance_scale`, `guidance_scale_2`, `weight`,
  `weight_name`.

A folder holds a LoRA in diffusers format (`pytorch_lora_weights.safetensors`) or PEFT format
(`adapter_config.json` + `adapter_model.safetensors`). For a pipeline with several experts (Wan 2.2 A14B), the LoRA
of each further expert sits next to it as `pytorch_lora_weights_<component>.safetensors` (`expert_weight_name`); a
teacher may carry LoRAs for some experts only and then supervises only the steps those experts run. Reading and
checking those files is `lora_io`'s.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from .lora_io import (
    DIFFUSERS_LORA_WEIGHTS,
    EXPERT_LORA_PATTERN,
    PEFT_WEIGHTS,
    _first_line,
    check_lora_fits,
    check_lora_folder,
    has_expert_lora,
    holds_lora,
    is_full_weight_folder,
    load_adapter_weights,
    lora_config_for,
    read_lora_folder,
)
from .registry import resolve_teacher_name


# Name of the student adapter on the shared transformer; reserved, so no teacher can take it.
STUDENT = "student"
# Folder of `output_dir` where teachers made for the base (`toy:<seed>`) are written; the `train` command writes its
# toy teachers there too, and files starting with `_` are never pushed to the Hub.
BUILT_TEACHERS_DIR = "_toy_teachers"

SPEC_FORMS = (
    "'./local/folder' (or '/abs/folder', '~/folder'), 'owner/repo', 'owner/repo@revision', 'owner/repo/sub/folder', "
    "'owner/repo/sub/folder@revision', a dict with 'path' and optional 'subfolder', 'revision', 'guidance_scale', "
    "'weight', 'weight_name', or a list of those (a weighted ensemble for one task, where a dict may also set 'name')"
)
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_SPEC = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?P<sub>(/[^/@\s]+)*)(@(?P<rev>[^@\s/][^@\s]*))?$")
_SPEC_KEYS = {"path", "subfolder", "revision", "guidance_scale", "guidance_scale_2", "weight", "weight_name"}
_LOCAL_PREFIXES = (".", "/", "~")
# Adapter names that are also names of PEFT's own sub-modules: `.lora_A.` would match every adapter's parameters.
_PEFT_INTERNAL_NAMES = frozenset(
    {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
)


@dataclass
class TeacherSpec:
    """One teacher: where its weights are and how it supervises.

    Attributes:
        name: Adapter name, by default the task the teacher supervises.
        path: Local folder or Hub repo id.
        subfolder: Folder inside the repo (or local folder) that holds the adapter.
        revision: Hub revision (branch, tag or commit).
        guidance_scale: CFG scale of this teacher's predictions; `None` uses the config's default.
        weight: Weight of this teacher in its task's loss (> 0; a task's weights are normalised to sum to 1).
        weight_name: Weight file name when a folder holds several.
        guidance_scale_2: CFG scale at the steps of the second (low-noise) expert of a two-expert pipeline;
            `None` uses the config's default.
    """

    name: str
    path: str
    subfolder: str | None = None
    revision: str | None = None
    guidance_scale: float | None = None
    weight: float = 1.0
    weight_name: str | None = None
    guidance_scale_2: float | None = None
    local_dir: Path | None = field(default=None, repr=False)
    # A full-weight teacher: a whole transformer (given as a module, or a folder recognised at resolution).
    module: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    full_weight: bool = False
    # The registered name (`world:letters`, `trl_diffusion_opd.registry`) that `path` was resolved from.
    alias: str | None = None
    # Experts (pipeline component names) this LoRA teacher has weights for, set when it is loaded.
    experts: tuple[str, ...] = field(default=(), repr=False, compare=False)
    # `build(pipeline, folder)` of a registered teacher made for the base it supervises (`toy:<seed>`): the trainer
    # writes it with `build_teacher` once the base is loaded.
    build: Callable[[Any, Path], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def needs_base(self) -> bool:
        """Whether the teacher is made for the base and not yet written (`build_teacher`)."""
        return self.build is not None and self.local_dir is None

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.path)

    @property
    def display(self) -> str:
        """`path[/subfolder][@revision]`, as users wrote it."""
        text = (self.alias or self.path) + (f"/{self.subfolder}" if self.subfolder else "")
        return text + (f"@{self.revision}" if self.revision else "")


def _malformed(name: str, spec: Any, problem: str) -> ValueError:
    return ValueError(f"Teacher '{name}': malformed spec {spec!r} ({problem}). Accepted forms: {SPEC_FORMS}.")


def _number(name: str, spec: Any, key: str, value: Any, positive: bool) -> float:
    """`value` as a finite float (> 0 when `positive`), else a malformed-spec error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _malformed(name, spec, f"'{key}' must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise _malformed(name, spec, f"'{key}' must be a number, got {value!r}") from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise _malformed(name, spec, f"'{key}' must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return number


def _parse_dict_spec(name: str, spec: dict[str, Any]) -> TeacherSpec:
    unknown = sorted(str(key) for key in set(spec) - _SPEC_KEYS)
    if unknown:
        raise _malformed(name, spec, f"unknown keys {unknown}")
    if "path" not in spec:
        raise _malformed(name, spec, "no 'path'")
    for key in ("path", "subfolder", "revision", "weight_name"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            # A YAML commit hash of digits only is read as a number: quote it.
            raise _malformed(name, spec, f"'{key}' must be a non-empty string (quote it in YAML), got {value!r}")
    base = parse_teacher_spec(name, spec["path"])
    for key in ("subfolder", "revision"):
        inline, explicit = getattr(base, key), spec.get(key)
        if inline is not None and explicit is not None and inline.strip("/") != explicit.strip("/"):
            raise _malformed(name, spec, f"'{key}' is given twice: '{inline}' in 'path' and '{explicit}'")
    subfolder = spec.get("subfolder") or base.subfolder
    guidance = spec.get("guidance_scale")
    guidance_2 = spec.get("guidance_scale_2")
    return TeacherSpec(
        name=name,
        path=base.path,
        subfolder=subfolder.strip("/") if subfolder else None,
        revision=spec.get("revision") or base.revision,
        guidance_scale=None if guidance is None else _number(name, spec, "guidance_scale", guidance, positive=False),
        guidance_scale_2=None
        if guidance_2 is None
        else _number(name, spec, "guidance_scale_2", guidance_2, positive=False),
        weight=_number(name, spec, "weight", spec.get("weight", 1.0), positive=True),
        weight_name=spec.get("weight_name"),
        alias=base.alias,
    )


def parse_teacher_spec(name: str, spec: str | dict[str, Any] | TeacherSpec) -> TeacherSpec:
    """Parse one teacher spec (see the module docstring for the accepted forms).

    A string that names an existing folder, or starts with `.`, `/` or `~`, is a local path and must exist; any other
    string must be a Hub id `owner/repo[/sub/folder][@revision]`.

    Raises:
        ValueError: the spec matches none of the accepted forms, a local path does not exist or is a file, or a dict
            has unknown keys, no `path`, a non-numeric or non-positive `weight`, or a subfolder or revision given
            twice with different values; the message lists the accepted forms.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, TeacherSpec):
        return spec
    if isinstance(spec, torch.nn.Module):
        return TeacherSpec(name=name, path=f"<{type(spec).__name__} module>", module=spec, full_weight=True)
    if isinstance(spec, dict):
        return _parse_dict_spec(name, spec)
    if not isinstance(spec, str) or not spec.strip():
        problem = "an empty string" if isinstance(spec, str) else f"type {type(spec).__name__}, not a string or a dict"
        raise _malformed(name, spec, problem)
    spec = spec.strip()
    if os.path.isdir(spec) or spec.startswith(_LOCAL_PREFIXES) or os.sep in spec and os.path.exists(spec):
        path = os.path.expanduser(spec)
        if os.path.isfile(path):
            raise _malformed(
                name,
                spec,
                "a file, not a folder: give its folder, with {'path': folder, 'weight_name': file} when it is not "
                f"named '{DIFFUSERS_LORA_WEIGHTS}' or '{PEFT_WEIGHTS}'",
            )
        if not os.path.isdir(path):
            raise _malformed(
                name,
                spec,
                f"local folder '{path}' does not exist; a spec starting with '.', '/' or '~' is a local path",
            )
        return TeacherSpec(name=name, path=path)
    try:
        named = resolve_teacher_name(spec)
    except ValueError as error:
        raise ValueError(f"Teacher '{name}': {error}") from error
    if callable(named):  # made for the base, written once the trainer has loaded it (`build_teacher`)
        return TeacherSpec(name=name, path=spec, alias=spec, build=named)
    if named is not None:  # a registered name (`trl_diffusion_opd.registry`): shown as written, loaded from its folder
        return TeacherSpec(name=name, path=named, alias=spec)
    match = _HUB_SPEC.match(spec)
    if match is None:
        raise _malformed(name, spec, "neither an existing local folder, a registered name nor a Hub id")
    return TeacherSpec(name=name, path=match["repo"], subfolder=match["sub"].strip("/") or None, revision=match["rev"])


def resolve_teacher(spec: TeacherSpec, cache_dir: str | None = None, token: str | bool | None = None) -> Path:
    """Return the local folder holding the teacher's adapter, downloading it from the Hub when needed.

    Only the adapter's files are downloaded (the LoRA weights and the small JSON files next to them, never a whole
    model), with huggingface_hub's progress bars. `HF_HUB_OFFLINE=1` resolves from the local cache. The result is kept
    on the spec, so a teacher is resolved once per run.

    Args:
        spec: The teacher.
        cache_dir: Hub cache folder; `None` uses `HF_HUB_CACHE`.
        token: Hub token for private or gated repos; `None` uses the stored login or `HF_TOKEN`.

    Raises:
        ValueError: the teacher cannot be found (the message names the teacher and says whether the Hub was
            offline). A full-weight model (a `transformer/` folder or a transformer config) is recognised and marked
            `spec.full_weight`; from the Hub its weights are downloaded too.
    """
    if spec.local_dir is not None or spec.module is not None:
        return spec.local_dir
    if spec.needs_base:
        raise ValueError(
            f"Teacher '{spec.name}': '{spec.display}' is made for the base model, so it is written once the base is "
            "loaded: give it to a trainer (or write it with `build_teacher`)."
        )
    if spec.is_local:
        folder = Path(spec.path)
    else:
        prefix = f"{spec.subfolder}/" if spec.subfolder else ""
        names = [DIFFUSERS_LORA_WEIGHTS, PEFT_WEIGHTS, "*.json"] + ([spec.weight_name] if spec.weight_name else [])
        try:
            folder = Path(
                snapshot_download(
                    spec.path,
                    revision=spec.revision,
                    allow_patterns=[prefix + name for name in names],
                    cache_dir=cache_dir,
                    token=token,
                )
            )
        except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
            hint = (
                f" '{spec.display}' is not a local folder either (prefix a relative local path with './')."
                if "@" not in spec.display
                else ""
            )
            raise ValueError(
                f"Teacher '{spec.name}': could not resolve '{spec.display}' from the Hub ({_hub_state()}): "
                f"{_first_line(error)}.{hint}"
            ) from error
    if spec.subfolder:
        folder = folder / spec.subfolder
    if not folder.is_dir():
        where = "local path" if spec.is_local else f"Hub repo, {_hub_state()}"
        raise ValueError(
            f"Teacher '{spec.name}': '{spec.display}' has no folder '{spec.subfolder or spec.path}' ({where})."
        )
    if not holds_lora(folder, spec.weight_name) and is_full_weight_folder(folder):
        spec.full_weight = True
        if not spec.is_local:  # only the small files came with the first download: fetch the weights now
            sub = "transformer/" if (folder / "transformer" / "config.json").is_file() else ""
            prefix = f"{spec.subfolder}/" if spec.subfolder else ""
            snapshot_download(
                spec.path, revision=spec.revision, allow_patterns=[f"{prefix}{sub}*"], cache_dir=cache_dir, token=token
            )
    spec.local_dir = folder
    return folder


def build_teacher(spec: TeacherSpec, pipeline: Any, folder: str | os.PathLike) -> Path:
    """Write a teacher that is made for the base (`spec.needs_base`: a registered builder such as `toy:<seed>`) for
    `pipeline` into `folder/<teacher name>`, then resolve and check it there like a local folder. The spec keeps its
    registered name for display (model cards).

    Returns:
        The teacher's folder.
    """
    spec.path, spec.build = os.fspath(spec.build(pipeline, Path(folder) / spec.name)), None
    folder = resolve_teacher(spec)
    check_teacher_files(spec)
    return folder


def load_full_teacher(spec: TeacherSpec, transformer_class: type, dtype: torch.dtype) -> torch.nn.Module:
    """Load a full-weight teacher (a pipeline folder with `transformer/`, or a transformer folder) as a frozen
    module in eval mode, or freeze the module the spec holds."""
    if spec.module is None:
        folder = spec.local_dir
        subfolder = "transformer" if (folder / "transformer" / "config.json").is_file() else None
        try:
            spec.module = transformer_class.from_pretrained(folder, subfolder=subfolder, dtype=dtype)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Teacher '{spec.name}': '{spec.display}' looks like a full-weight model but does not load as a "
                f"{transformer_class.__name__}: {_first_line(error)}"
            ) from error
    spec.module.eval().requires_grad_(False)
    return spec.module


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub's own flag is frozen when it is imported.
    env = os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(hub_constants.HF_HUB_OFFLINE) or env


def _hub_state() -> str:
    return "HF_HUB_OFFLINE=1: offline, local cache only" if _hub_offline() else "online"


@contextlib.contextmanager
def several_adapters():
    """Add adapters to a model that already has one, on purpose (student, teachers, old policy, evaluated rows).

    PEFT warns "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters"
    each time a second adapter is injected through diffusers' `add_adapter` / `load_lora_weights`; several named
    adapters on one base is this package's design, so exactly that warning is ignored here, and nothing else.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        yield


def add_adapter(model: torch.nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """`model.add_adapter(config, adapter_name=adapter_name)` (diffusers) without PEFT's multiple-adapters warning."""
    with several_adapters():
        model.add_adapter(config, adapter_name=adapter_name)


def load_lora_teacher(
    transformer: torch.nn.Module,
    spec: TeacherSpec,
    folder: Path,
    owner: str | None = None,
    weight_name: str | None = None,
) -> None:
    """Load a LoRA teacher as the adapter `spec.name` on `transformer`, frozen.

    Its rank, alpha and target modules are its own (they may differ from the student's and other teachers').
    `owner` names it in error messages (default `Teacher '<name>'`); `weight_name` overrides `spec.weight_name` (the
    file of another expert, `expert_weight_name`).

    Raises:
        ValueError: a file of the adapter is malformed, the adapter targets modules the base does not have, or its
            weights do not fit its config.
    """
    state_dict, lora_config, label = read_teacher_lora(transformer, spec, folder, owner, weight_name)
    add_adapter(transformer, lora_config, spec.name)
    load_adapter_weights(transformer, state_dict, spec.name, label)
    for param_name, param in transformer.named_parameters():
        if f".{spec.name}." in param_name:
            param.requires_grad_(False)


def read_teacher_lora(
    transformer: torch.nn.Module,
    spec: TeacherSpec,
    folder: Path,
    owner: str | None = None,
    weight_name: str | None = None,
) -> tuple[dict[str, torch.Tensor], LoraConfig, str]:
    """Read a LoRA teacher's weights and config and check that they fit `transformer` (`load_lora_teacher`'s
    arguments). Returns `(state_dict, lora_config, label)`, `label` naming the teacher in messages."""
    owner = owner or f"Teacher '{spec.name}'"
    label = f"{owner} ({spec.display})"
    state_dict, config = read_lora_folder(folder, weight_name or spec.weight_name, owner)
    check_lora_fits(transformer, {key: value.shape for key, value in state_dict.items()}, label)
    return state_dict, lora_config_for(state_dict, config), label


def check_teacher_files(spec: TeacherSpec, owner: str | None = None) -> None:
    """Check a resolved teacher's LoRA files (`check_lora_folder`) before any model is loaded; full-weight teachers
    are checked when they load."""
    if spec.module is None and not spec.full_weight and spec.local_dir is not None:
        owner = owner or f"Teacher '{spec.name}'"
        folder = Path(spec.local_dir)
        # Files of other experts (Wan 2.2's `pytorch_lora_weights_transformer_2.safetensors`) are checked too; a
        # teacher may hold only those (it then supervises only that expert's steps).
        experts = sorted(folder.glob(EXPERT_LORA_PATTERN)) if spec.weight_name is None else []
        if experts and not has_expert_lora(folder, "transformer", spec.weight_name):
            for path in experts:
                check_lora_folder(folder, path.name, owner)
            return
        check_lora_folder(folder, spec.weight_name, owner)
        for path in experts:
            check_lora_folder(folder, path.name, owner)


class AdapterSwitch:
    """Activates one named adapter (or none) on a PEFT-injected transformer and restores the student.

    The tuner layers are listed once, so switching costs one attribute write per adapted layer. Teachers are
    activated in inference mode (nothing requires grad); the student is restored as the only trainable adapter. A
    name held by `bank` (a `teacher_bank.TeacherBank`) activates that teacher's slot adapters, pointed at its weights.

    Args:
        transformer: The transformer carrying the adapters.
        student: Name of the trainable adapter.
    """

    def __init__(self, transformer: torch.nn.Module, student: str):
        self.student = student
        self.layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        self._flags_set = False
        # The trainer's `teacher_bank.TeacherBank`: its teachers run through the bank's shared slot adapters.
        self.bank = None

    def activate(self, name: str | None) -> None:
        """Make `name` the only active adapter (`None`: the plain base).

        The first activation of the student sets the `requires_grad` flags PEFT's way (the student trainable, every
        other adapter frozen); later switches only say which adapter is active, since PEFT's `set_adapter` walks
        every adapter of every layer, which with hundreds of teachers costs more than their forward passes.
        """
        active = self.bank.activate(name) if self.bank is not None and name in self.bank else [name]
        if not self._flags_set and name == self.student:
            for layer in self.layers:
                if layer.disable_adapters:
                    layer.enable_adapters(True)
                layer.set_adapter(name, inference_mode=False)
            self._flags_set = True
            return
        for layer in self.layers:
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = list(active)  # a list of its own, as PEFT keeps it

    def use(self, name: str | None):
        """Context manager: `with switch.use("ocr"): ...` runs with that adapter, then restores the student."""
        return _AdapterContext(self, name)


class _AdapterContext:
    def __init__(self, switch: AdapterSwitch, name: str | None):
        self.switch, self.name = switch, name

    def __enter__(self):
        self.switch.activate(self.name)

    def __exit__(self, *exc):
        self.switch.activate(self.switch.student)
        return False


def parse_teachers(teachers: dict[str, Any], reserved: tuple[str, ...] = ()) -> dict[str, list[TeacherSpec]]:
    """Parse `{task: spec or [specs]}` into `{task: [TeacherSpec]}`.

    A task with one teacher names its adapter after the task; an ensemble's teachers are named `{task}_{i}` unless a
    dict spec gives a `name`. Names are made valid module keys (every character other than letters, digits and `_`
    becomes `_`). The teachers of an ensemble may have different ranks, alphas, targets, guidance scales and weights.

    Raises:
        ValueError: empty input, an empty teacher list, a malformed spec, or a duplicate or reserved name (`reserved`
            and PEFT's own module names such as `lora_A`).
    """
    if not isinstance(teachers, dict) or not teachers:
        raise ValueError(f"`teachers` must be a non-empty dict {{task: teacher spec}}. Accepted specs: {SPEC_FORMS}.")
    parsed: dict[str, list[TeacherSpec]] = {}
    names: set[str] = set()
    for task, spec in teachers.items():
        specs = spec if isinstance(spec, list) else [spec]
        if not specs:
            raise ValueError(f"Task '{task}' has an empty teacher list. Accepted specs: {SPEC_FORMS}.")
        parsed[task] = []
        for index, item in enumerate(specs):
            name = str(task) if len(specs) == 1 else f"{task}_{index}"
            if isinstance(item, dict) and "name" in item:
                item = dict(item)
                name = item.pop("name")
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(
                        f"Task '{task}': teacher {index} has 'name' {name!r}; it must be a non-empty string."
                    )
            name = re.sub(r"\W", "_", name.strip())
            if name in reserved or name in _PEFT_INTERNAL_NAMES or name in names:
                raise ValueError(f"Teacher name '{name}' (task '{task}') is reserved or used twice.")
            names.add(name)
            parsed[task].append(parse_teacher_spec(name, item))
    return parsed
