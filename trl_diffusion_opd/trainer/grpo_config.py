"""`FlowGRPOConfig`: the training arguments of `FlowGRPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..objectives import RATIO_NORM_BIASES
from ..transition import CPS_LOG_PROBS
from .config_checks import check_choice, check_number
from .rl_config import DiffusionRLConfig


RATIO_NORMALIZATIONS = ("none", "grpo_guard")


@dataclass
class FlowGRPOConfig(DiffusionRLConfig):
    r"""
    Configuration class for the [`FlowGRPOTrainer`].

    Defaults follow Flow-GRPO's SD3.5-Medium recipe (`config/grpo.py::general_ocr_sd3` / `geneval_sd3` with
    `scripts/train_sd3.py`): the SDE sampler with noise level a = 0.7, 10 steps at 512 px, CFG 4.5 in the rollout and
    the loss, 24 images per prompt, the first ⌊0.99·N⌋ steps trained, KL coefficient 0.04, clip range 1e-4,
    advantages clipped to ±5 with the batch's std (`global_std=True`), AdamW at a constant lr 3e-4 (weight decay
    1e-4, clipping 1.0), T5 prompts of 128 tokens, EMA 0.9 every 8 steps, seed 42. GRPO-Guard is
    `ratio_normalization="grpo_guard"`, whose normalised ratio is much narrower, hence its clip range 2e-6 and lr 1e-4
    (see `examples/configs/sd35m_grpo_guard_ocr.yaml`). Each field is documented by its `help`; the shared ones are
    [`DiffusionRLConfig`]'s and [`DiffusionTrainingConfig`]'s, and [`~transformers.TrainingArguments`] has the rest.

    Deliberate deviations from the released script:

    - `per_device_train_batch_size` counts prompts (1 prompt = one group of `num_generations` images) where the
      script counts images per GPU and sets the groups per step through its GPU count (48 groups per epoch, two
      optimizer steps); scale it to your number of processes.
    - `torch_dtype="auto"` and no mixed precision (the script uses fp16 autocast), so that it runs on a CPU; the
      recipe YAMLs set bf16. The EMA has no warm-up (see [`DiffusionOPDConfig`]).
    - The pickscore recipe's KL coefficient is 0.01, not the default 0.04 (OCR and GenEval): set `beta`.

    One optimizer step: `per_device_train_batch_size` prompts per task and device, `num_generations` SDE rollouts
    each (log-probabilities stored), rewards, group-normalised advantages, then the PPO-clip loss over the first
    ⌊N·timestep_fraction⌋ steps, step by step (`step_batch_size` steps per call), accumulated into one update.
    """

    # Parameters whose default values are overridden
    per_device_train_batch_size: int = field(
        default=1,
        metadata={"help": "Prompts per task, per device and per optimizer step; each prompt is one group of images."},
    )
    num_generations: int = field(
        default=24, metadata={"help": "SDE rollouts per prompt, the group (Flow-GRPO's SD3.5 recipe: 24)."}
    )
    noise_level: float = field(
        default=0.7,
        metadata={
            "help": "Noise level a of the stochastic sampler (Flow-GRPO's 0.7); it must be > 0, since the ODE has "
            "no log-probability."
        },
    )
    beta: float = field(
        default=0.04,
        metadata={
            "help": "Coefficient of the per-step KL to the base model (adapter disabled), Flow-GRPO's "
            "||mu_theta - mu_ref||^2 / (2 sigma_t^2) averaged over latent elements; 0.04 is the OCR and GenEval "
            "recipes' (PickScore's: 0.01), 0.0 skips the reference calls."
        },
    )
    step_batch_size: int | None = field(
        default=1,
        metadata={"help": "Trained steps per model call (rows = steps x images); None batches all of them."},
    )

    # Parameters that control the loss
    clip_range: float = field(
        default=1e-4,
        metadata={"help": "PPO clip range epsilon of the importance ratio (Flow-GRPO's 1e-4; GRPO-Guard uses 2e-6)."},
    )
    ratio_normalization: str = field(
        default="none",
        metadata={
            "help": "Importance-ratio normalisation: 'none', Flow-GRPO's ratio exp(log p_theta - log p_old), or "
            "'grpo_guard', GRPO-Guard's RatioNorm (the log-ratio corrected by the mean shift and scaled by the "
            "step's std) with its per-step gradient reweighting 1/|dt|.",
            "choices": list(RATIO_NORMALIZATIONS),
        },
    )
    grpo_guard_bias: str = field(
        default="sample",
        metadata={
            "help": "Mean-shift correction b of GRPO-Guard's RatioNorm: 'sample' (the paper's form) gives each image "
            "its own b, so that every image's normalised log-ratio is zero-mean; 'batch' (the released "
            "train_sd3_GRPO_Guard.py) gives every image of a step the batch mean. They coincide on a batch's first "
            "optimizer step and for one image.",
            "choices": list(RATIO_NORM_BIASES),
        },
    )
    cps_log_prob: str = field(
        default="flow_grpo",
        metadata={
            "help": "Log-probability of a CPS transition (the SDE's is always the per-element mean of the Gaussian "
            "log-density): 'flow_grpo', Flow-GRPO's -mean((x' - mu)^2) without 1/(2 sigma^2) or constants, so that "
            "its published CPS clip ranges transfer; or 'gaussian', the exact per-element log-density, whose "
            "log-ratios are 1/(2 sigma_c^2) times larger (0.68 on the first SD3.5 step at a = 0.7, about 7900 on "
            "the last stochastic one). GRPO-Guard's RatioNorm always uses the Gaussian density.",
            "choices": list(CPS_LOG_PROBS),
        },
    )
    drop_zero_std_groups: bool = field(
        default=True,
        metadata={
            "help": "Drop the groups whose rewards are all equal (their advantages are exactly 0) before the loss, "
            "as Flow-GRPO's train_sd3.py does; if every group is constant the batch is kept (the KL term still "
            "acts)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.noise_level <= 0:
            raise ValueError(
                f"`noise_level` must be > 0 for Flow-GRPO (the ODE sampler has no log-probability), got "
                f"{self.noise_level}."
            )
        check_number("clip_range", self.clip_range, 0, low_open=True)
        check_choice("ratio_normalization", self.ratio_normalization, RATIO_NORMALIZATIONS)
        check_choice("grpo_guard_bias", self.grpo_guard_bias, RATIO_NORM_BIASES)
        check_choice("cps_log_prob", self.cps_log_prob, CPS_LOG_PROBS)
        if self.sde_type == "cps" and self.num_inference_steps < 2:
            raise ValueError(
                f"`num_inference_steps={self.num_inference_steps}` cannot be trained with `sde_type='cps'`: CPS's "
                "step into t = 0 is deterministic (std 0) and has no policy gradient; use `num_inference_steps` >= 2."
            )
