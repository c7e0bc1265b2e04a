"""One module per CLI command (`train`, `grpo`, `nft`, `eval`, `env`), each runnable as
`python -m trl_diffusion_opd.scripts.<command>` and as `trl-diffusion-opd <command>`; `utils` holds what they share.
Plug-ins add commands through `trl_diffusion_opd.registry.register_command` (the tiny world's `world`).

This module holds only what the dispatcher needs before a command's own imports (torch, diffusers, ...) run."""

from __future__ import annotations

import re
import sys


PROG = "trl-diffusion-opd"


def one_line(error: BaseException) -> str:
    """The error's message on one line (or its type when it has none)."""
    return re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__


def fail(prog: str, message: str) -> int:
    """Print `prog: error: message` to stderr and return the usage-error exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
