"""The trainers and their configurations, one method per `<method>_trainer.py` + `<method>_config.py` (TRL's layout):
`base_*` holds what every trainer shares, `rl_config.py` + `rl_trainer.py` what the reward-driven Stage-1 trainers
share.

The names load on first use (module `__getattr__`), so that a command's `--help`, which needs only the configurations,
imports no trainer (nor diffusers, which the trainers import)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


# public name -> the submodule that defines it
_LAZY = {
    "DiffusersTensorBoardCallback": ".callbacks",
    "DiffusionLoRATrainer": ".base_trainer",
    "DiffusionModelConfig": ".model_config",
    "DiffusionNFTConfig": ".nft_config",
    "DiffusionNFTTrainer": ".nft_trainer",
    "DiffusionOPDConfig": ".opd_config",
    "DiffusionOPDTrainer": ".opd_trainer",
    "DiffusionRLConfig": ".rl_config",
    "DiffusionRLTrainer": ".rl_trainer",
    "DiffusionTrainingConfig": ".base_config",
    "FlowGRPOConfig": ".grpo_config",
    "FlowGRPOTrainer": ".grpo_trainer",
    "RewardEvalCallback": ".callbacks",
}
__all__ = [
    "DiffusersTensorBoardCallback",
    "DiffusionLoRATrainer",
    "DiffusionModelConfig",
    "DiffusionNFTConfig",
    "DiffusionNFTTrainer",
    "DiffusionOPDConfig",
    "DiffusionOPDTrainer",
    "DiffusionRLConfig",
    "DiffusionRLTrainer",
    "DiffusionTrainingConfig",
    "FlowGRPOConfig",
    "FlowGRPOTrainer",
    "RewardEvalCallback",
]

if TYPE_CHECKING:  # what type checkers, IDEs and the API docs see
    from .base_config import DiffusionTrainingConfig
    from .base_trainer import DiffusionLoRATrainer
    from .callbacks import DiffusersTensorBoardCallback, RewardEvalCallback
    from .grpo_config import FlowGRPOConfig
    from .grpo_trainer import FlowGRPOTrainer
    from .model_config import DiffusionModelConfig
    from .nft_config import DiffusionNFTConfig
    from .nft_trainer import DiffusionNFTTrainer
    from .opd_config import DiffusionOPDConfig
    from .opd_trainer import DiffusionOPDTrainer
    from .rl_config import DiffusionRLConfig
    from .rl_trainer import DiffusionRLTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
