"""The `trl-diffusion-opd` console script: a small dispatcher over `trl_diffusion_opd.scripts`.

```bash
trl-diffusion-opd train --config examples/configs/tiny.yaml     # DiffusionOPD (scripts/train.py)
trl-diffusion-opd grpo --config examples/configs/tiny_grpo.yaml # Stage 1: Flow-GRPO / GRPO-Guard (scripts/grpo.py)
trl-diffusion-opd nft --config examples/configs/tiny_nft.yaml   # Stage 1: DiffusionNFT (scripts/nft.py)
trl-diffusion-opd eval --config eval.yaml                       # reward table and image grids (scripts/eval.py)
trl-diffusion-opd env                                           # versions, for bug reports (scripts/env.py)
```

Each command is a module with `main(argv) -> exit code`, also runnable as `python -m trl_diffusion_opd.scripts.<name>`;
plug-ins add commands through `trl_diffusion_opd.registry.register_command` (e.g. the tiny world's `world`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from . import __version__, registry
from .scripts.utils import PROG, fail


# name -> (module under `trl_diffusion_opd.scripts`, one-line help); a module is imported only when its command runs.
COMMANDS = {
    "train": ("train", "Distil reward-specific teachers into one LoRA student (accepts --config file.yaml)."),
    "grpo": ("grpo", "Stage 1: train a LoRA on rewards with Flow-GRPO / GRPO-Guard (accepts --config file.yaml)."),
    "nft": ("nft", "Stage 1: train a LoRA on rewards with DiffusionNFT (accepts --config file.yaml)."),
    "eval": ("eval", "Score a base model and its adapters on reward prompt sets; write the table and grids."),
    "env": ("env", "Print platform, accelerator and library versions for bug reports."),
}


def _commands() -> dict[str, tuple[Callable[[list[str]], int], str]]:
    found: dict[str, tuple[Callable[[list[str]], int], str]] = {
        name: (_script_main(module), help_text) for name, (module, help_text) in COMMANDS.items()
    }
    for name, command in registry.commands().items():
        found.setdefault(name, (command.main, command.help))
    return found


def _script_main(module: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        return importlib.import_module(f"{__package__}.scripts.{module}").main(argv)

    return run


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trl-diffusion-opd` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} {{{','.join(commands)}}} ...\n\ncommands:")
        for name, (_, help_text) in commands.items():
            print(f"  {name:<8}{help_text}")
        print(f"\nRun `{PROG} COMMAND --help` for a command's options.")
        return 0
    if argv[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    if argv[0] not in commands:
        return fail(PROG, f"unknown command '{argv[0]}' (choose from {', '.join(commands)})")
    return commands[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
