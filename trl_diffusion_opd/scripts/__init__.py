"""One module per CLI command (`train`, `grpo`, `nft`, `eval`, `env`), each runnable as
`python -m trl_diffusion_opd.scripts.<command>` and as `trl-diffusion-opd <command>`; `utils` holds what they share.
Plug-ins add commands through `trl_diffusion_opd.registry.register_command` (the tiny world's `world`).

This module holds only what the dispatcher needs before a command's own imports (torch, diffusers, ...) run."""

from __future__ import annotations

import logging
import re
import sys


PROG = "trl-diffusion-opd"

# Log lines of other libraries that tell a user of this package nothing, as (logger, text of the message). The
# programs (the console script, `python -m trl_diffusion_opd.scripts.<command>`, the demo) drop them with
# `quiet_library_logs()` before importing those libraries; the library itself configures no logging.
LIBRARY_NOISE = (
    # diffusers and peft import bitsandbytes whenever it is installed. On a CPU with AVX512-BF16, bitsandbytes then
    # tries to fetch an optional 4-bit matmul kernel from the Hub (through `kernels`) and, offline or for an
    # untrusted publisher, logs that it failed and keeps its own kernel. Nothing here runs 4-bit layers.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("kernels._internals.hf_hub", "'kernels-community/quantization-bitsandbytes'"),
    # diffusers' pipeline modules import `CLIPImageProcessor` / `SiglipImageProcessor` (for IP-Adapters) when they
    # load; without torchvision, transformers 5 warns that the name falls back to its PIL class. The pipelines this
    # package trains hold no image processor (`feature_extractor` is None).
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)


class _DropMessage(logging.Filter):
    """Drops the records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_library_logs() -> None:
    """Drop the `LIBRARY_NOISE` messages (only those: every other record of those loggers passes). For programs:
    call it before torch, diffusers or transformers is imported; calling it again changes nothing."""
    for name, text in LIBRARY_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


def one_line(error: BaseException) -> str:
    """The error's message on one line (or its type when it has none)."""
    return re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__


def fail(prog: str, message: str) -> int:
    """Print `prog: error: message` to stderr and return the usage-error exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
