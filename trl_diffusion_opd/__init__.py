"""trl-diffusion-opd: on-policy distillation of reward-specific diffusion teachers into one student."""

from importlib.metadata import PackageNotFoundError, version


try:
    __version__ = version("trl-diffusion-opd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


from .config import DiffusionOPDConfig, DiffusionRLConfig, DiffusionTrainingConfig  # noqa: E402
from .grpo_config import FlowGRPOConfig  # noqa: E402
from .grpo_trainer import FlowGRPOTrainer  # noqa: E402
from .nft_config import DiffusionNFTConfig  # noqa: E402
from .nft_trainer import DiffusionNFTTrainer  # noqa: E402
from .trainer import DiffusionOPDTrainer  # noqa: E402


__all__ = [
    "DiffusionNFTConfig",
    "DiffusionNFTTrainer",
    "DiffusionOPDConfig",
    "DiffusionOPDTrainer",
    "DiffusionRLConfig",
    "DiffusionTrainingConfig",
    "FlowGRPOConfig",
    "FlowGRPOTrainer",
    "__version__",
]
