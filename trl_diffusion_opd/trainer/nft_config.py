"""`DiffusionNFTConfig`: the training arguments of `DiffusionNFTTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import DiffusionRLConfig, check_choice, check_number


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
    after every optimizer step, seed 42. For the arguments shared with every trainer (model, sampling resolution,
    EMA, ...) see [`DiffusionTrainingConfig`], and [`~transformers.TrainingArguments`] for the rest.

    Deliberate deviations from the released script:

    - `per_device_train_batch_size` counts prompts (one group of `num_generations` images each), as in
      [`FlowGRPOConfig`].
    - `torch_dtype="auto"` and no mixed precision (fp16 autocast in the script), so that it runs on a CPU. The EMA
      has no warm-up (see [`DiffusionOPDConfig`]).
    - The OCR recipe (`sd3_ocr`) uses β = 0.1 and the old-policy decay `decay_type=2` (a flat start of 75 steps,
      then 0.0075·k up to 0.999), which `old_policy_decay` does not express; the default is GenEval's and PickScore's.

    Parameters:
        > Parameters that control generation

        num_generations (`int`, *optional*, defaults to `24`):
            Images sampled per prompt (the group).
        sampler (`str`, *optional*, defaults to `"heun"`):
            Deterministic sampler of the old policy: `"euler"` (first order) or `"heun"` (second order, two model
            calls per step but the last).
        guidance_scale (`float`, *optional*, defaults to `1.0`):
            CFG scale of sampling and training (`1.0`: CFG-free, as DiffusionNFT).
        num_inference_steps (`int`, *optional*, defaults to `10`):
            Sampler steps N; the trained times are the first ⌊N·timestep_fraction⌋ sigmas of that schedule.

        > Parameters that control the loss

        nft_beta (`float`, *optional*, defaults to `1.0`):
            Strength β of the implicit policies v⁺ = βv_θ + (1−β)v_old and v⁻ = (1+β)v_old − βv_θ.
        beta (`float`, *optional*, defaults to `1e-4`):
            Coefficient of the KL to the base, the element-mean ‖v_θ − v_ref‖² (adapter disabled); `0.0` skips the
            reference calls.
        old_policy_decay_rate (`float`, *optional*, defaults to `0.001`):
            The old policy follows θ_old ← η_k θ_old + (1 − η_k) θ after optimizer step k, with
            η_k = min(old_policy_decay_rate · k, old_policy_max_decay).
        old_policy_max_decay (`float`, *optional*, defaults to `0.5`):
            Upper bound of η_k.
        step_batch_size (`int` or `None`, *optional*, defaults to `1`):
            Trained times per model call (rows = times × images); `None` batches all of them.

        > Parameters that control the rewards and advantages

        scale_rewards (`str`, *optional*, defaults to `"batch"`):
            `"batch"` (global std: DiffusionNFT's `global_std=True`), `"group"` (per-prompt std) or `"none"`.
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to [−adv_clip_max, adv_clip_max] (and mapped to the weight r ∈ [0, 1]).

        > Parameters whose defaults differ from [`DiffusionTrainingConfig`]

        per_device_train_batch_size (`int`, *optional*, defaults to `1`):
            Prompts per task, device and optimizer step.
        ema_update_interval (`int`, *optional*, defaults to `1`):
            Update the EMA after every optimizer step (DiffusionNFT's `update_step_interval=1`).
    """

    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Prompts per task, per device and per optimizer step."}
    )
    num_generations: int = field(default=24, metadata={"help": "Images sampled per prompt (one group)."})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale (1.0: CFG-free)."})
    step_batch_size: int | None = field(
        default=1, metadata={"help": "Trained times per model call; None batches all of them."}
    )
    sampler: str = field(
        default="heun", metadata={"help": "Deterministic sampler of the old policy.", "choices": list(NFT_SAMPLERS)}
    )
    nft_beta: float = field(default=1.0, metadata={"help": "Strength beta of the implicit policies."})
    beta: float = field(default=1e-4, metadata={"help": "Coefficient of the KL to the base model."})
    ema_update_interval: int = field(default=1, metadata={"help": "Update the EMA every this many steps."})
    old_policy_decay_rate: float = field(
        default=0.001, metadata={"help": "Growth per step of the old policy's averaging decay."}
    )
    old_policy_max_decay: float = field(default=0.5, metadata={"help": "Upper bound of the old policy's decay."})

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
