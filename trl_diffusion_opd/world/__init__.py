"""A tiny text-to-image world that trains on a CPU (see `scenes`, `rewards`, `pipeline`, `pretrain`).

The world is a plug-in built on the package's public API: `register()` (the `trl_diffusion_opd.plugins` entry point,
called by `trl_diffusion_opd.registry` the first time a name is not found) adds

- the base pipeline `world:base`;
- the shipped Stage-1 teachers `world:<task>` (`composition`, `letters`, `aesthetic`);
- the prompt sources `world:<task>` (2048 training scenes, generator seed 0) and `world:<task>:heldout` (96
  held-out scenes, seed 1);
- the rewards `world_composition`, `world_letters`, `world_aesthetic` and `world_task`;
- the CLI command `trl-diffusion-opd world`.

Nothing in the rest of the package imports this folder: deleting it leaves a working package.
"""

from __future__ import annotations

from typing import Any

from .. import registry
from . import rewards  # noqa: F401  (registers the world_* rewards)
from .cli import world_command
from .demo import shipped_teachers
from .pipeline import load_world_pipeline
from .scenes import TASK_FAMILIES, task_prompts


PREFIX = "world:"
BASE = "world:base"
WORLD_TRAIN_ROWS, WORLD_HELDOUT_ROWS = 2048, 96
QUICKSTART = "from trl_diffusion_opd.world.pipeline import load_world_pipeline\n\npipe = load_world_pipeline()"


def _teacher_folder(name: str) -> str:
    shipped = shipped_teachers()
    task = name[len(PREFIX) :]
    if task not in shipped:
        raise ValueError(f"unknown world teacher '{name}'; the world has {sorted(shipped)}.")
    return shipped[task]


def world_prompts(name: str) -> list[dict[str, Any]]:
    """`world:<task>` (2048 training scenes, generator seed 0) or `world:<task>:heldout` (96 held-out scenes, seed
    1), rows with the scenes' metadata."""
    parts = name[len(PREFIX) :].split(":")
    task, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    if task not in TASK_FAMILIES or split not in ("train", "heldout") or len(parts) > 2:
        raise ValueError(
            f"'{name}' is not a world prompt set; use world:<task> or world:<task>:heldout with a task in "
            f"{list(TASK_FAMILIES)}."
        )
    if split == "train":
        return task_prompts(task, WORLD_TRAIN_ROWS, seed=0)
    return task_prompts(task, WORLD_HELDOUT_ROWS, seed=1)


def register() -> None:
    """Register the world's pipeline, teachers, prompt sources and CLI command (idempotent; its rewards register on
    import)."""
    shipped = "shipped inside the trl-diffusion-opd package"
    registry.register_pipeline(
        BASE, load_world_pipeline, quickstart=QUICKSTART, description=f"the tiny world's base, {shipped}"
    )
    registry.register_teacher("world", _teacher_folder, description=f"a Stage-1 teacher of the tiny world, {shipped}")
    registry.register_prompt_source("world", world_prompts)
    registry.register_command(
        "world",
        world_command,
        "The tiny text-to-image world: `world pretrain` (flow matching from scratch), `world eval` (reward table).",
    )
