"""The trainers and their configurations, one method per `<method>_trainer.py` + `<method>_config.py` (TRL's layout):
`base_*` holds what every trainer shares, `rl_trainer.py` what the reward-driven Stage-1 trainers share."""

from .base_config import DiffusionRLConfig, DiffusionTrainingConfig
from .base_trainer import DiffusionLoRATrainer
from .callbacks import DiffusersTensorBoardCallback, RewardEvalCallback
from .grpo_config import FlowGRPOConfig
from .grpo_trainer import FlowGRPOTrainer
from .model_config import DiffusionModelConfig
from .nft_config import DiffusionNFTConfig
from .nft_trainer import DiffusionNFTTrainer
from .opd_config import DiffusionOPDConfig
from .opd_trainer import DiffusionOPDTrainer
from .rl_trainer import DiffusionRLTrainer


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
