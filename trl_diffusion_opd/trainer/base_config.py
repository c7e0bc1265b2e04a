"""Training arguments shared by the trainers: `DiffusionTrainingConfig` (every trainer of the package) and
`DiffusionRLConfig` (the reward-driven Stage-1 trainers). Each method's own config is `<method>_config.py`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..objectives import SCALE_REWARDS
from ..transition import SAMPLERS


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _as_dict(value: Any, name: str) -> Any:
    """Dict fields are also accepted as JSON strings (command line, environment)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{name}` must be a dict or a JSON object string, got {value!r}: {error}") from error
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a dict, got {type(value).__name__}: {value!r}")
    return value


@dataclass
class DiffusionTrainingConfig(TrainingArguments):
    r"""
    Arguments shared by every trainer of the package: a LoRA student on a frozen flow-matching pipeline.

    Subclasses (`DiffusionOPDConfig`, `FlowGRPOConfig`, `DiffusionNFTConfig`) document these parameters again with
    their own defaults; see [`~transformers.TrainingArguments`] for the rest.

    Parameters:
        > Parameters that control the model

        torch_dtype (`str`, *optional*, defaults to `"auto"`):
            dtype of the pipeline when `model` is a Hub id or path.
        max_sequence_length (`int` or `None`, *optional*):
            Length of the T5 prompt embeddings; `None` uses the pipeline's default.
        revision (`str` or `None`, *optional*):
            Revision of the base model when `model` is a Hub id.
        student_adapter (`str` or `None`, *optional*):
            Existing LoRA (local folder or Hub spec, diffusers or PEFT format) to continue from instead of a fresh one.
        offload_text_encoders (`bool`, *optional*, defaults to `True`):
            Embed every prompt up front and move the text encoders to the CPU when they all fit in the cache.
        prompt_cache_size (`int`, *optional*, defaults to `1024`):
            Prompt embeddings kept on the device (LRU).

        > Parameters that control sampling

        num_inference_steps (`int`, *optional*, defaults to `10`):
            Number of sampler steps N.
        noise_level (`float`, *optional*, defaults to `0.0`):
            Noise level a of the SDE sampler; `0.0` is the deterministic ODE sampler.
        sde_type (`str`, *optional*, defaults to `"sde"`):
            Stochastic sampler when `noise_level > 0`: `"sde"` (Flow-GRPO) or `"cps"` (coefficient-preserving).
        guidance_scale (`float`, *optional*, defaults to `4.5`):
            Student CFG scale.
        guidance_scale_2 (`float` or `None`, *optional*):
            Two-expert pipelines (Wan 2.2 A14B) only: the student's CFG scale at the low-noise expert's steps, as
            `WanPipeline`'s `guidance_scale_2`; `None` uses `guidance_scale`.
        negative_prompt (`str`, *optional*, defaults to `""`):
            Prompt of the unconditional CFG branch.
        resolution (`int`, *optional*, defaults to `512`):
            Image side in pixels.
        num_frames (`int` or `None`, *optional*):
            Video families only: frames per video (Wan: 1 + a multiple of 4); `None` uses the family's default.
        timestep_fraction (`float`, *optional*, defaults to `0.99`):
            Train the first ⌊N·timestep_fraction⌋ steps.
        step_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Trained steps evaluated together in one model call; `None` batches all of them.

        > Parameters that control evaluation

        eval_rewards (`dict[str, list[str]]`, `str` or `None`, *optional*):
            Rewards of the student's samples every `eval_steps` (`RewardEvalCallback`); `None` disables it.

        > Parameters that control the EMA of the student

        ema (`bool`, *optional*, defaults to `True`):
            Keep an exponential moving average of the student LoRA; saved adapters and evaluations use it.
        ema_decay (`float`, *optional*, defaults to `0.9`):
            EMA decay.
        ema_update_interval (`int`, *optional*, defaults to `8`):
            Update the EMA every this many optimizer steps.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["eval_rewards"]

    # Parameters whose default values are overridden from TrainingArguments
    learning_rate: float = field(default=3e-4, metadata={"help": "The initial learning rate for AdamW."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay of AdamW."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient norm clipping at each optimizer step."})
    per_device_train_batch_size: int = field(
        default=3, metadata={"help": "Prompts per task, per device and per optimizer step."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column (prompt metadata is passed through)."}
    )

    # Parameters that control the model
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the pipeline when loaded from a path.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    max_sequence_length: int | None = field(default=None, metadata={"help": "Length of the T5 prompt embeddings."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model on the Hub."})
    student_adapter: str | None = field(
        default=None, metadata={"help": "Existing LoRA to continue training from (local folder or Hub spec)."}
    )
    offload_text_encoders: bool = field(
        default=True, metadata={"help": "Embed all prompts up front and move the text encoders to the CPU."}
    )
    prompt_cache_size: int = field(default=1024, metadata={"help": "Prompt embeddings kept on the device (LRU)."})

    # Parameters that control sampling
    num_inference_steps: int = field(default=10, metadata={"help": "Number of sampler steps of the rollout."})
    noise_level: float = field(default=0.0, metadata={"help": "SDE noise level a; 0 uses the ODE sampler."})
    sde_type: str = field(default="sde", metadata={"help": "Stochastic sampler.", "choices": list(SAMPLERS)})
    guidance_scale: float = field(default=4.5, metadata={"help": "Student CFG scale (rollout and loss)."})
    guidance_scale_2: float | None = field(
        default=None,
        metadata={"help": "Two-expert pipelines (Wan 2.2): student CFG scale of the low-noise expert; None: same."},
    )
    negative_prompt: str = field(default="", metadata={"help": "Prompt of the unconditional CFG branch."})
    resolution: int = field(default=512, metadata={"help": "Image side in pixels."})
    num_frames: int | None = field(
        default=None, metadata={"help": "Video families: frames per video; None uses the family's default."}
    )
    timestep_fraction: float = field(
        default=0.99, metadata={"help": "Train the first floor(N * timestep_fraction) sampler steps."}
    )
    step_batch_size: int | None = field(
        default=None, metadata={"help": "Trained steps per model call; None batches all of them."}
    )

    # Parameters that control evaluation
    eval_rewards: dict | str | None = field(
        default=None,
        metadata={
            "help": "Rewards of the student's samples every eval_steps: {task: [reward, ...]}, 'a,b' for every "
            "task, or '' for grids only."
        },
    )

    # Parameters that control the EMA
    ema: bool = field(default=True, metadata={"help": "Keep an EMA of the student LoRA."})
    ema_decay: float = field(default=0.9, metadata={"help": "EMA decay."})
    ema_update_interval: int = field(default=8, metadata={"help": "Update the EMA every this many steps."})

    def __post_init__(self):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # Without this, transformers leaves a multi-process CPU launch undistributed and the ranks' students
            # silently drift apart.
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        super().__post_init__()

        if self.num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {self.num_inference_steps}.")
        if self.noise_level < 0:
            raise ValueError(f"`noise_level` must be >= 0, got {self.noise_level}.")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"`timestep_fraction` must be in (0, 1], got {self.timestep_fraction}.")
        if self.sde_type not in SAMPLERS:
            raise ValueError(f"`sde_type` must be one of {SAMPLERS}, got {self.sde_type!r}.")
        if self.resolution < 1:
            raise ValueError(f"`resolution` must be positive, got {self.resolution}.")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"`num_frames` must be positive or None, got {self.num_frames}.")
        if self.step_batch_size is not None and self.step_batch_size < 1:
            raise ValueError(f"`step_batch_size` must be >= 1 or None, got {self.step_batch_size}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}.")
        if self.ema_update_interval < 1:
            raise ValueError(f"`ema_update_interval` must be >= 1, got {self.ema_update_interval}.")
        if self.prompt_cache_size < 1:
            raise ValueError(f"`prompt_cache_size` must be >= 1, got {self.prompt_cache_size}.")

    @property
    def num_train_timesteps(self) -> int:
        """Number T of trained sampler steps, ⌊N·timestep_fraction⌋ but at least 1."""
        return max(1, int(self.num_inference_steps * self.timestep_fraction))


@dataclass
class DiffusionRLConfig(DiffusionTrainingConfig):
    r"""
    Arguments shared by the reward-driven trainers (`FlowGRPOConfig`, `DiffusionNFTConfig`).

    Parameters:
        num_generations (`int`, *optional*, defaults to `8`):
            Images sampled per prompt (the group whose rewards are normalised together).
        generation_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Images sampled per model call during generation; `None` samples the whole batch at once.
        num_iterations (`int`, *optional*, defaults to `1`):
            Optimizer steps taken on each generated batch (TRL's μ): the batch is reused, so from the second step on
            the policy has moved away from the one that sampled it.
        reward_weights (`list[float]` or `None`, *optional*):
            Weight of each reward function; `None` weighs them all 1. A reward that returns `nan` for an image (e.g.
            OCR on a prompt without text) contributes 0 to that image's total.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            Standard deviation that divides the advantages: `"group"` (per prompt, Flow-GRPO's per-prompt stat
            tracking), `"batch"` (over the whole batch) or `"none"`.
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to [−adv_clip_max, adv_clip_max].
        beta (`float`, *optional*, defaults to `0.0`):
            Coefficient of the KL to the base model (the adapter disabled); `0.0` skips the reference calls.
    """

    _VALID_DICT_FIELDS = DiffusionTrainingConfig._VALID_DICT_FIELDS + ["reward_weights"]

    num_generations: int = field(default=8, metadata={"help": "Images sampled per prompt (one group)."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Images per model call while sampling; None samples all at once."}
    )
    num_iterations: int = field(default=1, metadata={"help": "Optimizer steps per generated batch."})
    reward_weights: list[float] | str | None = field(
        default=None, metadata={"help": "Weight of each reward function (a list, or a JSON list string)."}
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Std that divides the advantages.", "choices": list(SCALE_REWARDS)},
    )
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to [-max, max]."})
    beta: float = field(default=0.0, metadata={"help": "Coefficient of the KL to the base model."})

    def __post_init__(self):
        if isinstance(self.reward_weights, str):
            try:
                self.reward_weights = json.loads(self.reward_weights)
            except json.JSONDecodeError as error:
                raise ValueError(f"`reward_weights` must be a list of numbers: {error}") from error
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(
                f"`num_generations` must be >= 2 (advantages compare the images of one prompt), got "
                f"{self.num_generations}."
            )
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ValueError(f"`generation_batch_size` must be >= 1 or None, got {self.generation_batch_size}.")
        if self.num_iterations < 1:
            raise ValueError(f"`num_iterations` must be >= 1, got {self.num_iterations}.")
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, list) or not all(
                isinstance(w, (int, float)) for w in self.reward_weights
            ):
                raise ValueError(f"`reward_weights` must be a list of numbers, got {self.reward_weights!r}.")
            self.reward_weights = [float(w) for w in self.reward_weights]
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"`scale_rewards` must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}.")
        if not self.adv_clip_max > 0:
            raise ValueError(f"`adv_clip_max` must be > 0, got {self.adv_clip_max}.")
        if self.beta < 0:
            raise ValueError(f"`beta` must be >= 0, got {self.beta}.")
