"""`DiffusionRLConfig`: the training arguments the reward-driven Stage-1 trainers (`rl_trainer.py`: Flow-GRPO,
DiffusionNFT) share on top of `DiffusionTrainingConfig`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..objectives import SCALE_REWARDS
from .base_config import DiffusionTrainingConfig
from .config_checks import check_choice, check_int, check_number


@dataclass
class DiffusionRLConfig(DiffusionTrainingConfig):
    r"""
    Arguments shared by the reward-driven trainers (`FlowGRPOConfig`, `DiffusionNFTConfig`): the groups of images,
    the rewards and the advantages. Each field is documented by its `help`; the rest is [`DiffusionTrainingConfig`].
    """

    _VALID_DICT_FIELDS = DiffusionTrainingConfig._VALID_DICT_FIELDS + ["reward_weights"]

    num_generations: int = field(
        default=8,
        metadata={"help": "Images sampled per prompt: the group whose rewards are normalised together (at least 2)."},
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Images sampled per model call during generation; None samples the whole batch at once."},
    )
    num_iterations: int = field(
        default=1,
        metadata={
            "help": "Optimizer steps taken on each generated batch (TRL's mu): the batch is reused, so from the "
            "second step on the policy has moved away from the one that sampled it."
        },
    )
    reward_weights: list[float] | str | None = field(
        default=None,
        metadata={
            "help": "Weight of each reward function (a list, or a JSON list string); None weighs them all 1. A "
            "reward that returns nan for an image (e.g. OCR on a prompt without text) contributes 0 to its total."
        },
    )
    scale_rewards: str = field(
        default="batch",
        metadata={
            "help": "Standard deviation that divides the advantages (the mean is always the prompt's group's): "
            "'batch' (over the whole batch: `global_std=True`, which Flow-GRPO's and DiffusionNFT's SD3.5 recipes "
            "use), 'group' (the prompt's own group) or 'none'.",
            "choices": list(SCALE_REWARDS),
        },
    )
    adv_clip_max: float = field(
        default=5.0,
        metadata={"help": "Advantages are clipped to [-adv_clip_max, adv_clip_max] (the released recipes use 5)."},
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "Coefficient of the KL to the base model (the adapter disabled); 0.0 skips the reference calls."
        },
    )

    def __post_init__(self):
        if isinstance(self.reward_weights, str):
            try:
                self.reward_weights = json.loads(self.reward_weights)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`reward_weights` must be a list of numbers (a JSON list on the command line): {error}"
                ) from error
        super().__post_init__()
        if check_int("num_generations", self.num_generations) < 2:
            raise ValueError(
                f"`num_generations` must be >= 2 (advantages compare the images of one prompt), got "
                f"{self.num_generations}."
            )
        check_int("generation_batch_size", self.generation_batch_size, 1, optional=True)
        check_int("num_iterations", self.num_iterations, 1)
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, (list, tuple)) or not self.reward_weights:
                raise ValueError(f"`reward_weights` must be a non-empty list of numbers, got {self.reward_weights!r}.")
            for index, weight in enumerate(self.reward_weights):
                check_number(f"reward_weights[{index}]", weight)
            self.reward_weights = [float(w) for w in self.reward_weights]
        check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check_number("adv_clip_max", self.adv_clip_max, 0, low_open=True)
        check_number("beta", self.beta, 0)
