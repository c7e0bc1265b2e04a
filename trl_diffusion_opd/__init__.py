"""trl-diffusion-opd: on-policy distillation of reward-specific diffusion teachers into one student.

The public names load on first use (module `__getattr__`, as transformers and diffusers do), so that
`import trl_diffusion_opd` and the command line's `--help` / `--version` do not import torch, diffusers or transformers.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any


try:
    __version__ = version("trl-diffusion-opd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


__all__ = [
    "DiffusionLoRATrainer",
    "DiffusionModelConfig",
    "DiffusionNFTConfig",
    "DiffusionNFTTrainer",
    "DiffusionOPDConfig",
    "DiffusionOPDTrainer",
    "DiffusionRLConfig",
    "DiffusionTrainingConfig",
    "FlowGRPOConfig",
    "FlowGRPOTrainer",
    "RewardEvalCallback",
    "__version__",
]

# public name -> the submodule that defines it
_LAZY = dict.fromkeys(__all__[:-1], ".trainer")

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .trainer import (
        DiffusionLoRATrainer,
        DiffusionModelConfig,
        DiffusionNFTConfig,
        DiffusionNFTTrainer,
        DiffusionOPDConfig,
        DiffusionOPDTrainer,
        DiffusionRLConfig,
        DiffusionTrainingConfig,
        FlowGRPOConfig,
        FlowGRPOTrainer,
        RewardEvalCallback,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
