"""`DiffusionNFTConfig`: the training arguments of `DiffusionNFTTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config_checks import check_choice, check_number
from .rl_config import DiffusionRLConfig


NFT_SAMPLERS = ("euler", "heun")


@dataclass
class DiffusionNFTConfig(DiffusionRLConfig):
    r"""
    Configuration class for the [`DiffusionNFTTrainer`].

    Defaults follow DiffusionNFT's SD3.5-Medium recipe (`config/nft.py::sd3_geneval` / `sd3_pickscore` with
    `scripts/train_nft_sd3.py`): AdamW at a constant lr 3e-4 (weight decay 1e-4, clipping 1.0), β = 1, CFG-free
    sampling and training, 10 steps of a deterministic second-order sampler at 512 px, 24 images per prompt, the
    first ⌊0.99·N⌋ times trained, KL coefficient 1e-4, advantages clipped to ±5 with the batch's std
    (`global_std=True`), the old policy's decay min(0.001·k, 0.5) (`decay_type=1`), T5 prompts of 128 tokens, EMA 0.9
    after every optimizer step, seed 42. Each field is documented by its `help`; the shared ones are
    [`DiffusionRLConfig`]'s and [`DiffusionTrainingConfig`]'s, and [`~transformers.TrainingArguments`] has the rest.

    Deliberate deviations from the released script:

    - `per_device_train_batch_size` counts prompts (one group of `num_generations` images each), as in
      [`FlowGRPOConfig`].
    - `torch_dtype="auto"` and no mixed precision (fp16 autocast in the script), so that it runs on a CPU. The EMA
      has no warm-up (see [`DiffusionOPDConfig`]).
    - The OCR recipe (`sd3_ocr`) uses β = 0.1 and the old-policy decay `decay_type=2` (a flat start of 75 steps,
      then 0.0075·k up to 0.999), which `old_policy_decay` does not express; the default is GenEval's and PickScore's.
    """

    per_device_train_batch_size: int = field(
        default=1,
        metadata={"help": "Prompts per task, per device and per optimizer step; each prompt is one group of images."},
    )
    num_generations: int = field(
        default=24, metadata={"help": "Images sampled per prompt, the group (DiffusionNFT's SD3.5 recipe: 24)."}
    )
    guidance_scale: float = field(
        default=1.0,
        metadata={"help": "CFG scale of sampling and training; 1.0 is CFG-free, as DiffusionNFT trains."},
    )
    step_batch_size: int | None = field(
        default=1,
        metadata={"help": "Trained times per model call (rows = times x images); None batches all of them."},
    )
    sampler: str = field(
        default="heun",
        metadata={
            "help": "Deterministic sampler of the old policy: 'euler' (first order) or 'heun' (second order, two "
            "model calls per step but the last; the released recipe's).",
            "choices": list(NFT_SAMPLERS),
        },
    )
    nft_beta: float = field(
        default=1.0,
        metadata={
            "help": "Strength beta of the implicit policies v+ = beta v_theta + (1 - beta) v_old and "
            "v- = (1 + beta) v_old - beta v_theta (the GenEval and PickScore recipes use 1; OCR's 0.1)."
        },
    )
    beta: float = field(
        default=1e-4,
        metadata={
            "help": "Coefficient of the KL to the base, the element-mean ||v_theta - v_ref||^2 (adapter disabled); "
            "the released recipe uses 1e-4, and 0.0 skips the reference calls."
        },
    )
    ema_update_interval: int = field(
        default=1,
        metadata={
            "help": "Update the EMA after every this many optimizer steps (DiffusionNFT's update_step_interval=1)."
        },
    )
    old_policy_decay_rate: float = field(
        default=0.001,
        metadata={
            "help": "The old policy follows theta_old <- eta_k theta_old + (1 - eta_k) theta after optimizer step k, "
            "with eta_k = min(old_policy_decay_rate * k, old_policy_max_decay); the released decay_type=1 uses 0.001."
        },
    )
    old_policy_max_decay: float = field(
        default=0.5,
        metadata={"help": "Upper bound of the old policy's decay eta_k (the released decay_type=1 uses 0.5)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.noise_level != 0:
            raise ValueError(
                f"DiffusionNFT samples with a deterministic sampler: `noise_level` must be 0, got {self.noise_level}."
            )
        check_choice("sampler", self.sampler, NFT_SAMPLERS)
        check_number("nft_beta", self.nft_beta, 0, low_open=True)
        check_number("old_policy_decay_rate", self.old_policy_decay_rate, 0)
        check_number("old_policy_max_decay", self.old_policy_max_decay, 0, 1, high_open=True)

    def old_policy_decay(self, step: int) -> float:
        """η_k of the old policy's update after optimizer step `step`."""
        return min(self.old_policy_decay_rate * step, self.old_policy_max_decay)
