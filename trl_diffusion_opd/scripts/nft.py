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

from ..trainer import DiffusionModelConfig, DiffusionNFTConfig, DiffusionNFTTrainer
from .utils import PROG, DiffusionParser, DiffusionRLScriptArguments, build_rl_trainer, training_main


def make_parser(prog: str | None = None) -> DiffusionParser:
    """The parser of `nft`: `(DiffusionRLScriptArguments, DiffusionNFTConfig, DiffusionModelConfig)`, with
    `--config file.yaml`."""
    return DiffusionParser(
        (DiffusionRLScriptArguments, DiffusionNFTConfig, DiffusionModelConfig),
        prog=prog or f"{PROG} nft",
        example="tiny_nft.yaml",
    )


def build_trainer(
    script_args: DiffusionRLScriptArguments, training_args: DiffusionNFTConfig, model_args: DiffusionModelConfig
):
    """The `DiffusionNFTTrainer` that the `nft` command runs."""
    return build_rl_trainer(DiffusionNFTTrainer, script_args, training_args, model_args)


def main(argv: list[str] | None = None) -> int:
    """`trl-diffusion-opd nft ARGS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return training_main(argv, "nft", make_parser(), build_trainer, module=__name__)


if __name__ == "__main__":
    sys.exit(main())
