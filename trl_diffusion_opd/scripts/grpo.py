"""`trl-diffusion-opd grpo`: Stage 1: train a reward-specific teacher (a LoRA) with Flow-GRPO or GRPO-Guard (`FlowGRPOTrainer`).

```bash
trl-diffusion-opd grpo --config examples/configs/tiny_grpo.yaml
python -m trl_diffusion_opd.scripts.grpo --config examples/configs/tiny_grpo.yaml   # the same job
```

The argument groups are `DiffusionRLScriptArguments` (`reward_funcs`, `prompts`), `FlowGRPOConfig` and
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
    from ..trainer.grpo_config import FlowGRPOConfig
    from ..trainer.model_config import DiffusionModelConfig


def make_parser(prog: str | None = None) -> DiffusionParser:
    """The parser of `grpo`: `(DiffusionRLScriptArguments, FlowGRPOConfig, DiffusionModelConfig)`, with
    `--config file.yaml`."""
    from ..trainer.grpo_config import FlowGRPOConfig
    from ..trainer.model_config import DiffusionModelConfig

    return DiffusionParser(
        (DiffusionRLScriptArguments, FlowGRPOConfig, DiffusionModelConfig),
        prog=prog or f"{PROG} grpo",
        example="tiny_grpo.yaml",
    )


def build_trainer(
    script_args: DiffusionRLScriptArguments, training_args: FlowGRPOConfig, model_args: DiffusionModelConfig
):
    """The `FlowGRPOTrainer` that the `grpo` command runs."""
    from ..trainer.grpo_trainer import FlowGRPOTrainer

    return build_rl_trainer(FlowGRPOTrainer, script_args, training_args, model_args)


def main(argv: list[str] | None = None) -> int:
    """`trl-diffusion-opd grpo ARGS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_logs()
    return training_main(argv, "grpo", make_parser(), build_trainer, module=__name__)


if __name__ == "__main__":
    sys.exit(main())
