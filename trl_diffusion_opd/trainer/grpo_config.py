"""`FlowGRPOConfig`: the training arguments of `FlowGRPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import DiffusionRLConfig, check_choice, check_number


RATIO_NORMALIZATIONS = ("none", "grpo_guard")


@dataclass
class FlowGRPOConfig(DiffusionRLConfig):
    r"""
    Configuration class for the [`FlowGRPOTrainer`].

    Defaults follow Flow-GRPO's SD3.5-Medium recipe (the SDE sampler with noise level a = 0.7, 10 steps, CFG 4.5, KL
    coefficient 0.04, clip range 1e-4). GRPO-Guard is `ratio_normalization="grpo_guard"`, whose normalised ratio is
    much narrower, hence its clip range 2e-6 (see `examples/configs/sd35m_grpo_guard_ocr.yaml`). For the arguments
    shared with every trainer (model, sampling, EMA, ...) see [`DiffusionTrainingConfig`], and
    [`~transformers.TrainingArguments`] for the rest.

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
            `"sde"` (Flow-GRPO's Euler–Maruyama step) or `"cps"` (coefficient-preserving).
        guidance_scale (`float`, *optional*, defaults to `4.5`):
            CFG scale, in the rollout and in the loss.
        num_inference_steps (`int`, *optional*, defaults to `10`):
            Sampler steps N.
        timestep_fraction (`float`, *optional*, defaults to `0.99`):
            Train the first ⌊N·timestep_fraction⌋ steps.

        > Parameters that control the rewards and advantages

        reward_weights (`list[float]` or `None`, *optional*):
            Weight of each reward function; `None` weighs them all 1.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            `"group"` (per-prompt std), `"batch"` (global std) or `"none"`.
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to [−adv_clip_max, adv_clip_max].

        > Parameters that control the loss

        clip_range (`float`, *optional*, defaults to `1e-4`):
            PPO clip range ε of the importance ratio.
        ratio_normalization (`str`, *optional*, defaults to `"none"`):
            `"none"`: Flow-GRPO's ratio exp(log p_θ − log p_old). `"grpo_guard"`: GRPO-Guard's RatioNorm (the
            log-ratio corrected by the mean shift ‖μ_θ − μ_old‖²/(2σ̄²) and scaled by σ̄) with its per-step
            gradient reweighting 1/|Δt|.
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

    def __post_init__(self):
        super().__post_init__()
        if self.noise_level <= 0:
            raise ValueError(
                f"`noise_level` must be > 0 for Flow-GRPO (the ODE sampler has no log-probability), got "
                f"{self.noise_level}."
            )
        check_number("clip_range", self.clip_range, 0, low_open=True)
        check_choice("ratio_normalization", self.ratio_normalization, RATIO_NORMALIZATIONS)
