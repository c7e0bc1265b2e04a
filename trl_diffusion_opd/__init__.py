"""trl-diffusion-opd: on-policy distillation of reward-specific diffusion teachers into one student."""

from importlib.metadata import PackageNotFoundError, version


try:
    __version__ = version("trl-diffusion-opd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


from .config import DiffusionOPDConfig  # noqa: E402
from .trainer import DiffusionOPDTrainer  # noqa: E402


__all__ = ["DiffusionOPDConfig", "DiffusionOPDTrainer", "__version__"]
