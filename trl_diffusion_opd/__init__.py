"""trl-diffusion-opd: on-policy distillation of reward-specific diffusion teachers into one student."""

from importlib.metadata import PackageNotFoundError, version


try:
    __version__ = version("trl-diffusion-opd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


from .trainer import (  # noqa: E402
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
