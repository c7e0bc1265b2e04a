"""The `trl-diffusion-opd` console script: a small dispatcher over `trl_diffusion_opd.scripts`.

```bash
trl-diffusion-opd train --config examples/configs/tiny.yaml     # DiffusionOPD (scripts/train.py)
trl-diffusion-opd grpo --config examples/configs/tiny_grpo.yaml # Stage 1: Flow-GRPO / GRPO-Guard (scripts/grpo.py)
trl-diffusion-opd nft --config examples/configs/tiny_nft.yaml   # Stage 1: DiffusionNFT (scripts/nft.py)
trl-diffusion-opd eval --config eval.yaml                       # reward table and image grids (scripts/eval.py)
trl-diffusion-opd merge --config merge.yaml                     # merge LoRAs with PEFT, no training (scripts/merge.py)
trl-diffusion-opd env                                           # versions, for bug reports (scripts/env.py)
```

Each command is a module with `main(argv) -> exit code`, also runnable as `python -m trl_diffusion_opd.scripts.<name>`;
plug-ins add commands through `trl_diffusion_opd.registry.register_command` (e.g. the tiny world's `world`).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from . import __version__, registry
from .scripts import PROG, fail, quiet_library_logs


# name -> (module under `trl_diffusion_opd.scripts`, one-line help); a module is imported only when its command runs,
# so that `--help` and `--version` answer without importing torch, diffusers or transformers.
COMMANDS = {
    "train": ("train", "Distil reward-specific teachers into one LoRA student (accepts --config file.yaml)."),
    "grpo": ("grpo", "Stage 1: train a LoRA on rewards with Flow-GRPO / GRPO-Guard (accepts --config file.yaml)."),
    "nft": ("nft", "Stage 1: train a LoRA on rewards with DiffusionNFT (accepts --config file.yaml)."),
    "eval": ("eval", "Score a base model and its adapters on reward prompt sets; write the table and grids."),
    "merge": ("merge", "Merge LoRA adapters (the teachers) into one with PEFT, no training; the baseline to beat."),
    "env": ("env", "Print platform, accelerator and library versions for bug reports."),
}


def _commands(plugins: bool = True) -> dict[str, tuple[Callable[[list[str]], int], str]]:
    """The built-in commands, then (when `plugins`, which loads the plug-ins) the plug-ins' commands."""
    found: dict[str, tuple[Callable[[list[str]], int], str]] = {
        name: (_script_main(module), help_text) for name, (module, help_text) in COMMANDS.items()
    }
    if plugins:
        for name, command in registry.commands().items():
            found.setdefault(name, (command.main, command.help))
    return found


def _script_main(module: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        return importlib.import_module(f"{__package__}.scripts.{module}").main(argv)

    return run


def _usage(commands: dict) -> str:
    return f"usage: {PROG} {{{','.join(commands)}}} ... | --help [--all] | --version"


def _print_help(all_commands: bool) -> None:
    commands = _commands(plugins=all_commands)
    print(f"{_usage(commands)}\n\ncommands:")
    for name, (_, help_text) in commands.items():
        print(f"  {name:<8}{help_text}")
    if not all_commands:
        # Plug-ins are not loaded here (they import torch and diffusers): their names are enough to point at them.
        names = sorted({entry.name for entry in entry_points(group=registry.PLUGIN_GROUP)})
        if names:
            print(f"\nInstalled plug-ins ({', '.join(names)}) may add commands: `{PROG} --help --all` lists them.")
    print(f"\nRun `{PROG} COMMAND --help` for a command's options, e.g. `{PROG} train --help`.")
    print(f"Start with the tiny offline example: `{PROG} train --config examples/configs/tiny.yaml`.")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trl-diffusion-opd` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_logs()  # a program configures logging, before any command imports diffusers or transformers
    if not argv:
        print(_usage(COMMANDS), file=sys.stderr)
        return fail(PROG, f"a command is required (choose from {', '.join(COMMANDS)}; `{PROG} --help` lists them)")
    if argv[0] in ("-h", "--help"):
        _print_help(all_commands="--all" in argv[1:])
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"{PROG} {__version__}")
        return 0
    commands = _commands(plugins=argv[0] not in COMMANDS)
    if argv[0] not in commands:
        close = difflib.get_close_matches(argv[0], list(commands), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return fail(PROG, f"unknown command '{argv[0]}' (choose from {', '.join(commands)}){hint}")
    return commands[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
