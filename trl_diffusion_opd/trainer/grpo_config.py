"""`FlowGRPOConfig`: the training arguments of `FlowGRPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..objectives import RATIO_NORM_BIASES
from ..transition import CPS_LOG_PROBS
from .base_config import DiffusionRLConfig, check_choice, check_number


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
    `ratio_normalization="grpo_guard"`, whose normalised ratio is much narrower, hence its clip range 2e-6 (see
    `examples/configs/sd35m_grpo_guard_ocr.yaml`). For the arguments shared with every trainer (model, sampling,
    EMA, ...) see [`DiffusionTrainingConfig`], and [`~transformers.TrainingArguments`] for the rest.

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

    Parameters:
        > Parameters that control generation

        num_generations (`int`, *optional*, defaults to `24`):
            SDE rollouts per prompt (the group).
        generation_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Rollouts per model call; `None` samples them all at once.
        noise_level (`float`, *optional*, defaults to `0.7`):
            Noise level a of the stochastic sampler (must be > 0: the ODE has no log-probability).
        sde_type (`str`, *optional*, defaults to `"sde"`):
            `"sde"` (Flow-GRPO's Euler–Maruyama step) or `"cps"` (coefficient-preserving). CPS's step into t = 0 is
            deterministic (std 0): it carries no policy gradient, so CPS needs `num_inference_steps` ≥ 2.
        cps_log_prob (`str`, *optional*, defaults to `"flow_grpo"`):
            Log-probability of a CPS transition (the SDE's is always the per-element mean of the Gaussian
            log-density, as in Flow-GRPO). `"flow_grpo"`: Flow-GRPO's −mean((x′ − μ)²), without 1/(2σ²) or
            constants, so that its published CPS clip ranges transfer. `"gaussian"`: the exact per-element Gaussian
            log-density, whose log-ratios are 1/(2σ_c²) times larger (0.68 on the first SD3.5 step at a = 0.7,
            about 7900 on the last stochastic one, t_next = 0.0089), so the clip range must change accordingly.
            GRPO-Guard's RatioNorm always uses the Gaussian density (its formula is derived for it).
        guidance_scale (`float`, *optional*, defaults to `4.5`):
            CFG scale, in the rollout and in the loss.
        num_inference_steps (`int`, *optional*, defaults to `10`):
            Sampler steps N.
        timestep_fraction (`float`, *optional*, defaults to `0.99`):
            Train the first ⌊N·timestep_fraction⌋ steps.

        > Parameters that control the rewards and advantages

        reward_weights (`list[float]` or `None`, *optional*):
            Weight of each reward function; `None` weighs them all 1.
        scale_rewards (`str`, *optional*, defaults to `"batch"`):
            `"batch"` (global std: Flow-GRPO's `global_std=True`), `"group"` (per-prompt std) or `"none"`.
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to [−adv_clip_max, adv_clip_max].
        drop_zero_std_groups (`bool`, *optional*, defaults to `True`):
            Drop the groups whose rewards are all equal before the loss (their advantages are exactly 0), as
            Flow-GRPO's `train_sd3.py` does: no compute is spent on them and the loss averages over the informative
            images only. If every group is constant the batch is kept (its policy loss is 0; the KL term still acts).

        > Parameters that control the loss

        clip_range (`float`, *optional*, defaults to `1e-4`):
            PPO clip range ε of the importance ratio.
        ratio_normalization (`str`, *optional*, defaults to `"none"`):
            `"none"`: Flow-GRPO's ratio exp(log p_θ − log p_old). `"grpo_guard"`: GRPO-Guard's RatioNorm (the
            log-ratio corrected by the mean shift ‖μ_θ − μ_old‖²/(2σ̄²) and scaled by σ̄) with its per-step
            gradient reweighting 1/|Δt|.
        grpo_guard_bias (`str`, *optional*, defaults to `"sample"`):
            Mean-shift correction b of GRPO-Guard's RatioNorm. `"sample"` (the paper's form): each image's own
            b_i = ‖μ_θ − μ_old‖²/(2Dσ̄²), so every image's normalised log-ratio is zero-mean. `"batch"` (the released
            `train_sd3_GRPO_Guard.py`, whose reduction averages over the whole batch): every image of a step gets the
            batch mean of b_i. They coincide on a batch's first optimizer step (μ_θ = μ_old) and for one image.
        beta (`float`, *optional*, defaults to `0.04`):
            Coefficient of the per-step KL to the base model (adapter disabled), Flow-GRPO's
            ‖μ_θ − μ_ref‖²/(2σ_t²) averaged over latent elements; `0.0` skips the reference calls.
        num_iterations (`int`, *optional*, defaults to `1`):
            Optimizer steps per generated batch; from the second one the ratio differs from 1 and clipping acts.
        step_batch_size (`int` or `None`, *optional*, defaults to `1`):
            Trained steps per model call (rows = steps × images); `None` batches all of them.

        > Parameters whose defaults differ from [`DiffusionTrainingConfig`]

        learning_rate (`float`, *optional*, defaults to `3e-4`):
            AdamW learning rate (Flow-GRPO's; GRPO-Guard uses 1e-4).
        per_device_train_batch_size (`int`, *optional*, defaults to `1`):
            Prompts per task, device and optimizer step.
    """

    # Parameters whose default values are overridden
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Prompts per task, per device and per optimizer step."}
    )
    num_generations: int = field(default=24, metadata={"help": "SDE rollouts per prompt (one group)."})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (> 0)."})
    beta: float = field(default=0.04, metadata={"help": "Coefficient of the KL to the base model."})
    step_batch_size: int | None = field(
        default=1, metadata={"help": "Trained steps per model call; None batches all of them."}
    )

    # Parameters that control the loss
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range of the importance ratio."})
    ratio_normalization: str = field(
        default="none",
        metadata={"help": "Importance-ratio normalisation.", "choices": list(RATIO_NORMALIZATIONS)},
    )
    grpo_guard_bias: str = field(
        default="sample",
        metadata={
            "help": "GRPO-Guard's mean-shift correction: per image ('sample', the paper's) or the batch mean "
            "('batch', the released code's).",
            "choices": list(RATIO_NORM_BIASES),
        },
    )
    cps_log_prob: str = field(
        default="flow_grpo",
        metadata={
            "help": "Log-probability of CPS transitions: Flow-GRPO's -mean((x'-mu)^2) ('flow_grpo', its clip ranges "
            "transfer) or the exact Gaussian log-density per element ('gaussian').",
            "choices": list(CPS_LOG_PROBS),
        },
    )
    drop_zero_std_groups: bool = field(
        default=True,
        metadata={"help": "Drop groups whose rewards are all equal (zero advantages) before the loss, as Flow-GRPO."},
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
