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

from ..trainer import DiffusionModelConfig, FlowGRPOConfig, FlowGRPOTrainer
from .utils import PROG, DiffusionParser, DiffusionRLScriptArguments, build_rl_trainer, training_main


def make_parser(prog: str | None = None) -> DiffusionParser:
    """The parser of `grpo`: `(DiffusionRLScriptArguments, FlowGRPOConfig, DiffusionModelConfig)`, with
    `--config file.yaml`."""
    return DiffusionParser(
        (DiffusionRLScriptArguments, FlowGRPOConfig, DiffusionModelConfig),
        prog=prog or f"{PROG} grpo",
        example="tiny_grpo.yaml",
    )


def build_trainer(
    script_args: DiffusionRLScriptArguments, training_args: FlowGRPOConfig, model_args: DiffusionModelConfig
):
    """The `FlowGRPOTrainer` that the `grpo` command runs."""
    return build_rl_trainer(FlowGRPOTrainer, script_args, training_args, model_args)


def main(argv: list[str] | None = None) -> int:
    """`trl-diffusion-opd grpo ARGS`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return training_main(argv, "grpo", make_parser(), build_trainer, module=__name__)


if __name__ == "__main__":
    sys.exit(main())
