"""`trl-diffusion-opd nft`: Stage 1: train a reward-specific teacher (a LoRA) with DiffusionNFT (`DiffusionNFTTrainer`).

```bash
trl-diffusion-opd nft --config examples/configs/tiny_nft.yaml
python -m trl_diffusion_opd.scripts.nft --config examples/configs/tiny_nft.yaml   # the same job
```

The argument groups are `DiffusionRLScriptArguments` (`reward_funcs`, `prompts`), `DiffusionNFTConfig` and
`DiffusionModelConfig`; `accelerate launch` options relaunch the job as for `train`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .utils import (
    PROG,
    DiffusionParser,
    DiffusionRLScriptArguments,
    build_rl_trainer,
    quiet_library_logs,
    training_main,
)


# The configurations load in `make_parser` and the trainer in `build_trainer`: `--help` imports no diffusers, and
# `main` quiets other libraries' noise before transformers loads.
if TYPE_CHECKING:
    from ..trainer.model_config import DiffusionModelConfig
    from ..trainer.nft_config import DiffusionNFTConfig


def make_parser(prog: str | None = None) -> DiffusionParser:
    """The parser of `nft`: `(DiffusionRLScriptArguments, DiffusionNFTConfig, DiffusionModelConfig)`, with
    `--config file.yaml`."""
    from ..trainer.model_config import DiffusionModelConfig
    from ..trainer.nft_config import DiffusionNFTConfig

    return DiffusionParser(
        (DiffusionRLScriptArguments, DiffusionNFTConfig, DiffusionModelConfig),
        prog=prog or f"{PROG} nft",
        example="tiny_nft.yaml",
    )


def build_trainer(
    script_args: DiffusionRLScriptArguments, training_args: DiffusionNFTConfig, model_args: DiffusionModelConfig
):
    """The `DiffusionNFTTrainer` that the `nft` command runs."""
    from ..trainer.nft_trainer import DiffusionNFTTrainer

    return build_rl_trainer(DiffusionNFTTrainer, script_args, training_args, model_args)


def main(argv: list[str] | None = None) -> int:
    """`trl-diffusion-opd nft ARGS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_logs()
    return training_main(argv, "nft", make_parser(), build_trainer, module=__name__)


if __name__ == "__main__":
    sys.exit(main())
