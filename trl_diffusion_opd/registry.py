"""Named base pipelines, teachers, prompt sources and CLI commands: a small public registry for plug-ins.

A name has the form `<scheme>:<rest>` (`world:base`, `world:letters`, `world:letters:heldout`, `tiny:sd3`). Wherever
the package accepts a model id, a teacher spec or a prompt source, a registered name works too, from the Python API
and the CLI alike:

```python
from trl_diffusion_opd import registry

registry.register_pipeline("mylab:base", load_my_base, quickstart="from mylab import load_my_base\npipe = load_my_base()")
registry.register_teacher("mylab", lambda name: f"/shared/teachers/{name.split(':', 1)[1]}")  # mylab:<task>
# a teacher made for the base it supervises: `build(pipeline, folder)` writes it (as `toy:<seed>` does)
registry.register_teacher("mylab-rand", lambda name: lambda pipeline, folder: save_random_lora(pipeline, folder))
registry.register_prompt_source("mylab", lambda name: [{"prompt": "a cat"}, {"prompt": "a dog"}])
```

Packages register themselves through the `trl_diffusion_opd.plugins` entry-point group: each entry point is a
function without arguments that calls the `register_*` functions. Plug-ins are loaded once, the first time a name is
not found, so importing the package stays cheap. The package's own tiny pipelines (`tiny:<family>`,
`trl_diffusion_opd.testing`) and its demo world (`world:*`, `trl_diffusion_opd.world`) are such plug-ins.

This module imports nothing from the rest of the package: every layer may use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any


PLUGIN_GROUP = "trl_diffusion_opd.plugins"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedPipeline:
    """A registered base pipeline.

    Attributes:
        name: The full name, e.g. `world:base`.
        loader: Builds the pipeline (no arguments), on the CPU in float32.
        quickstart: Python code that defines `pipe` for a reader (shown in model cards instead of a local path).
        description: Where the pipeline comes from, in a few words (model cards print it).
    """

    name: str
    loader: Callable[[], Any]
    quickstart: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class NamedCommand:
    """A registered CLI sub-command: `main(argv) -> exit code`."""

    name: str
    main: Callable[[list[str]], int]
    help: str


_PIPELINES: dict[str, NamedPipeline] = {}
# A teacher resolver returns a folder, or a function `build(pipeline, folder) -> folder` that writes the teacher for
# the base it will supervise (`toy:<seed>`: a random LoRA shaped for that base).
TeacherBuilder = Callable[[Any, os.PathLike], str | os.PathLike]
_TEACHERS: dict[str, Callable[[str], str | os.PathLike | TeacherBuilder]] = {}
_TEACHER_DESCRIPTIONS: dict[str, str] = {}
_PROMPT_SOURCES: dict[str, Callable[[str], list[dict[str, Any]]]] = {}
_COMMANDS: dict[str, NamedCommand] = {}
_plugins_loaded = False


def _check_scheme(scheme: str) -> str:
    if not scheme or not scheme.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"A scheme is a word such as 'world' or 'mylab', got {scheme!r}.")
    return scheme


def register_pipeline(
    name: str, loader: Callable[[], Any], quickstart: str | None = None, description: str | None = None
) -> None:
    """Register the base pipeline `name` (`scheme:rest`), built by `loader()`; `quickstart` is code that defines
    `pipe` for a reader of a model card, `description` says in a few words where it comes from."""
    _check_scheme(name.partition(":")[0])
    _PIPELINES[name] = NamedPipeline(name, loader, quickstart, description)


def register_teacher(
    scheme: str, resolver: Callable[[str], str | os.PathLike | TeacherBuilder], description: str | None = None
) -> None:
    """Register the teachers `scheme:<rest>`: `resolver(name)` returns the local folder of the adapter (or of a
    full-weight transformer), or, for a teacher made for the base it supervises, a function `build(pipeline,
    folder)` that writes it into `folder` and returns that folder (the trainer calls it once the base is loaded,
    with `output_dir/_toy_teachers/<teacher>`); raise `ValueError` for an unknown name. `description` (model cards
    print it) says in a few words where these teachers come from."""
    _TEACHERS[_check_scheme(scheme)] = resolver
    if description:
        _TEACHER_DESCRIPTIONS[scheme] = description


def register_prompt_source(scheme: str, loader: Callable[[str], list[dict[str, Any]]]) -> None:
    """Register the prompt sources `scheme:<rest>`: `loader(name)` returns rows, dicts with a `"prompt"` string and
    any metadata. Raise `ValueError` for an unknown name."""
    _PROMPT_SOURCES[_check_scheme(scheme)] = loader


def register_command(name: str, main: Callable[[list[str]], int], help: str) -> None:
    """Register the CLI sub-command `trl-diffusion-opd <name>`; `main(argv)` returns the exit code."""
    _COMMANDS[_check_scheme(name)] = NamedCommand(name, main, help)


def load_plugins() -> None:
    """Call every `trl_diffusion_opd.plugins` entry point once. A plug-in that fails to load is skipped with a
    warning, so one broken plug-in cannot break the package."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in entry_points(group=PLUGIN_GROUP):
        try:
            entry_point.load()()
        except Exception as error:  # a third-party plug-in's failure is reported, not raised
            logger.warning("trl-diffusion-opd plug-in '%s' failed to load: %s", entry_point.name, error)


def _scheme(name: Any) -> str | None:
    if not isinstance(name, str) or ":" not in name:
        return None
    return name.partition(":")[0]


def _lookup(table: dict[str, Any], key: str | None) -> Any:
    if key is None:
        return None
    if key not in table:
        load_plugins()
    return table.get(key)


def get_pipeline(name: str) -> NamedPipeline | None:
    """The registered pipeline `name`, or `None` when `name` is not a registered name (a Hub id or a folder)."""
    return _lookup(_PIPELINES, name if _scheme(name) else None)


def pipeline_names() -> list[str]:
    """Every registered pipeline name."""
    load_plugins()
    return sorted(_PIPELINES)


def resolve_teacher_name(name: str) -> str | TeacherBuilder | None:
    """The local folder of the registered teacher `name` (`scheme:rest`), its `build(pipeline, folder)` function
    when it is made for the base (`register_teacher`), or `None` when its scheme is not registered. Raises
    `ValueError` when the scheme is registered but the name is unknown."""
    resolver = _lookup(_TEACHERS, _scheme(name))
    if resolver is None:
        return None
    found = resolver(name)
    return found if callable(found) else os.fspath(found)


def teacher_description(name: str) -> str | None:
    """The description registered with the scheme of teacher `name`, if any."""
    return _TEACHER_DESCRIPTIONS.get(_scheme(name) or "")


def load_named_prompts(name: str) -> list[dict[str, Any]] | None:
    """The rows of the registered prompt source `name`, or `None` when its scheme is not registered."""
    loader = _lookup(_PROMPT_SOURCES, _scheme(name))
    return None if loader is None else loader(name)


# Attribute of a pipeline loaded with another `pipeline_class`: the class its model_index names (`load_pipeline`).
LOADED_AS = "_trl_diffusion_opd_loaded_as"
# Attribute of a pipeline built in memory that records how (`record_built_pipeline`).
_BUILT_BY = "_trl_diffusion_opd_built_by"


def record_built_pipeline(pipeline: Any, description: str, quickstart: str | None = None) -> None:
    """Record how `pipeline`, built in memory (it has no Hub id or folder), was made, for model cards: `description`
    in a few words and `quickstart`, code that defines `pipe` the same way."""
    setattr(pipeline, _BUILT_BY, (description, quickstart))


def built_pipeline(pipeline: Any) -> tuple[str, str | None] | None:
    """`(description, quickstart)` recorded by `record_built_pipeline`, or `None`."""
    return getattr(pipeline, _BUILT_BY, None)


def commands() -> dict[str, NamedCommand]:
    """The registered CLI sub-commands."""
    load_plugins()
    return dict(_COMMANDS)


def load_pipeline(
    name: str,
    torch_dtype: str = "auto",
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    pipeline_class: str | None = None,
):
    """Load a base pipeline by name: a registered name (built by its plug-in, float32 on the CPU), else a Hub id or a
    local folder through `DiffusionPipeline.from_pretrained` with `torch_dtype` (`"auto"`, `"bfloat16"`, ...).
    `pipeline_class` (a diffusers pipeline class name) re-wraps the loaded components in that class
    (`from_pipe`: no copy), e.g. Wan 2.2 TI2V-5B, published as a `WanPipeline`, as a `WanImageToVideoPipeline`.

    Raises:
        ValueError: `name` looks like a registered name (`scheme:rest`, not a folder) but none is registered, or the
            pipeline's components do not make a `pipeline_class`.
    """
    import torch
    from diffusers import DiffusionPipeline

    named = get_pipeline(name)
    if named is not None:
        pipeline = named.loader()
    else:
        scheme = _scheme(name)
        if scheme is not None and "/" not in scheme and not os.path.exists(name):
            known = ", ".join(pipeline_names()) or "none"
            raise ValueError(
                f"'{name}' is not a registered pipeline name (registered: {known}), a Hub id or a folder."
            )
        dtype = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
        pipeline = DiffusionPipeline.from_pretrained(
            name, dtype=dtype, revision=revision, cache_dir=cache_dir, token=token
        )
    if pipeline_class is not None and type(pipeline).__name__ != pipeline_class:
        import diffusers

        loaded = type(pipeline).__name__
        try:
            pipeline = getattr(diffusers, pipeline_class).from_pipe(pipeline)
        except (TypeError, ValueError, AttributeError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"'{name}' ({loaded}) does not load as `pipeline_class` {pipeline_class}: {message}")
        setattr(pipeline, LOADED_AS, loaded)
    if named is not None or pipeline_class is not None:
        pipeline.register_to_config(_name_or_path=name)
    return pipeline
