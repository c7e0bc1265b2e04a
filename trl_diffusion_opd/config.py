"""Training arguments: `DiffusionTrainingConfig` (shared by every trainer of the package), `DiffusionRLConfig`
(shared by the reward-driven Stage-1 trainers) and `DiffusionOPDConfig` (`DiffusionOPDTrainer`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from .objectives import SCALE_REWARDS
from .transition import KL_NORMALIZATIONS, SAMPLERS


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

    The optimisation defaults are those every released SD3.5-Medium script shares (DiffusionOPD's
    `train_sd3_opd.py`, Flow-GRPO's `train_sd3.py`, DiffusionNFT's `train_nft_sd3.py`): AdamW (β = 0.9, 0.999,
    ε = 1e-8) with lr 3e-4, weight decay 1e-4, gradient clipping 1.0, a *constant* learning rate (the scripts build no
    scheduler, so `lr_scheduler_type` is `"constant"` here, not transformers' `"linear"`), no warm-up, seed 42, T5
    prompts of 128 tokens, 10 sampler steps at 512 px, and an EMA of decay 0.9.

    Parameters:
        > Parameters that control the model

        torch_dtype (`str`, *optional*, defaults to `"auto"`):
            dtype of the pipeline when `model` is a Hub id or path.
        max_sequence_length (`int` or `None`, *optional*, defaults to `128`):
            Length of the T5 prompt embeddings (the released scripts' 128); `None` uses the pipeline's default (256
            for SD3, 512 for FLUX).
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
        negative_prompt (`str`, *optional*, defaults to `""`):
            Prompt of the unconditional CFG branch.
        resolution (`int`, *optional*, defaults to `512`):
            Image side in pixels.
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
    lr_scheduler_type: SchedulerType | str = field(
        default="constant",
        metadata={"help": "The scheduler type to use (the released recipes keep the learning rate constant)."},
    )
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
    max_sequence_length: int | None = field(
        default=128, metadata={"help": "Length of the T5 prompt embeddings; None uses the pipeline's default."}
    )
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
    negative_prompt: str = field(default="", metadata={"help": "Prompt of the unconditional CFG branch."})
    resolution: int = field(default=512, metadata={"help": "Image side in pixels."})
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
        scale_rewards (`str`, *optional*, defaults to `"batch"`):
            Standard deviation that divides the advantages (the mean is always the prompt's group's): `"batch"` (over
            the whole batch: `global_std=True`, which Flow-GRPO's and DiffusionNFT's SD3.5 recipes use), `"group"`
            (the prompt's own group) or `"none"`.
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
        default="batch",
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


@dataclass
class DiffusionOPDConfig(DiffusionTrainingConfig):
    r"""
    Configuration class for the [`DiffusionOPDTrainer`].

    This class includes only the parameters that are specific to DiffusionOPD training. For a full list of training
    arguments, please refer to the [`~transformers.TrainingArguments`] documentation. Defaults follow the paper's
    released recipe for SD3.5-Medium (`config/opd.py::mopd` and `scripts/train_sd3_opd.py` of the DiffusionOPD
    release) and may differ from those of [`~transformers.TrainingArguments`]: AdamW at a constant lr 3e-4 (weight
    decay 1e-4, clipping 1.0), T5 prompts of 128 tokens, the 10-step ODE rollout (noise level 0) at 512 px with
    student CFG 4.5, the first ⌊0.99·N⌋ steps trained, 3 prompts per task and round, EMA 0.9 every 8 rounds, seed 42.

    Deliberate deviations from the released script:

    - `torch_dtype="auto"` and no mixed precision (the script trains in fp16 autocast): the package must also run on
      a CPU; the recipe YAML (`examples/configs/sd35m_three_teachers.yaml`) sets `torch_dtype: bfloat16`.
    - `teacher_guidance_scale=None` (the student's CFG): the released teachers' scales (GenEval 1.0, OCR and
      aesthetics 4.5) belong to those teachers and are set per task in the recipe YAML.
    - The EMA decay is 0.9 from the first update; the script's `EMAModuleWrapper` warms up as min((1 + k)/(10 + k),
      0.9), which matters only for the first ~80 rounds.
    - A round visits the tasks in a fixed order and takes one optimizer step; the script shuffles the round's
      prompts of all tasks into micro-batches before the same single step (same gradient up to summation order).

    One optimizer step is one *round*: every task is visited once, in a fixed order, with
    `per_device_train_batch_size` prompts per task and device; the per-task losses are accumulated and a single
    optimizer step is taken.

    Parameters:
        > Parameters that control the model

        torch_dtype (`str`, *optional*, defaults to `"auto"`):
            dtype of the pipeline when `model` is a Hub id or path: `"auto"`, `"bfloat16"`, `"float16"` or
            `"float32"`. The student LoRA parameters are always kept in float32.
        max_sequence_length (`int` or `None`, *optional*, defaults to `128`):
            Length of the T5 prompt embeddings (the released script's 128); `None` uses the pipeline's default (256
            for SD3, 512 for FLUX).
        revision (`str` or `None`, *optional*):
            Revision of the base model when `model` is a Hub id.
        student_adapter (`str` or `None`, *optional*):
            Existing LoRA (local folder or Hub spec, diffusers or PEFT format) to continue from instead of a fresh one.
        offload_text_encoders (`bool`, *optional*, defaults to `True`):
            When every training and evaluation prompt fits in the prompt cache, embed them all before training and
            move the text encoders to the CPU (SD3.5's T5-XXL alone is ~9 GB in bf16).
        teacher_offload (`bool`, *optional*, defaults to `False`):
            Keep full-weight teachers on the CPU between their calls, so that M full teachers cost one resident copy
            at a time on the accelerator (LoRA teachers share the base and need no offload).
        prompt_cache_size (`int`, *optional*, defaults to `1024`):
            Number of prompt embeddings kept on the device, least recently used evicted, so that text encoders run
            once per prompt.

        > Parameters that control the rollout

        num_inference_steps (`int`, *optional*, defaults to `10`):
            Number of sampler steps N of the student rollout.
        noise_level (`float`, *optional*, defaults to `0.0`):
            Noise level a of the SDE sampler; `0.0` uses the deterministic ODE sampler, which converges fastest.
        sde_type (`str`, *optional*, defaults to `"sde"`):
            Stochastic sampler when `noise_level > 0`: `"sde"` (Flow-GRPO's Euler–Maruyama) or `"cps"`
            (coefficient-preserving).
        guidance_scale (`float`, *optional*, defaults to `4.5`):
            Student CFG scale, used in the rollout and in the loss (the gradient flows through both CFG branches).
        teacher_guidance_scale (`float`, `dict[str, float]` or `None`, *optional*):
            Teacher CFG scale, one value or one per task (e.g. `{"geneval": 1.0, "ocr": 4.5}`); a teacher spec's own
            `guidance_scale` wins. `None` uses `guidance_scale`.
        negative_prompt (`str`, *optional*, defaults to `""`):
            Prompt of the unconditional CFG branch.
        resolution (`int`, *optional*, defaults to `512`):
            Image side in pixels.
        timestep_fraction (`float`, *optional*, defaults to `0.99`):
            Train the first ⌊N·timestep_fraction⌋ steps; the default skips the near-deterministic last step.

        > Parameters that control the loss

        loss_type (`str`, *optional*, defaults to `"kl"`):
            `"kl"`: the closed-form per-step reverse KL. `"ppo"`: the paper's PPO-style ablation (needs
            `noise_level > 0`).
        kl_normalization (`str`, *optional*, defaults to `"reference"`):
            `"reference"`: per-dimension mean divided by σ_t² (the released code's convention, so published
            hyper-parameters transfer). `"paper"`: summed over dimensions and divided by the transition variance
            (Eq. 11 of the paper).
        task_weights (`dict[str, float]` or `None`, *optional*):
            Weight of each task's loss; missing tasks weigh 1.
        ppo_clip_range (`float` or `None`, *optional*, defaults to `None`):
            PPO clipping range of the importance ratio with `loss_type="ppo"`.
        step_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Trained steps evaluated together in one teacher / student call (rows = steps × prompts). `None`
            batches all trained steps; lower it to bound activation memory.

        > Parameters that control the optimisation

        learning_rate (`float`, *optional*, defaults to `3e-4`):
            AdamW learning rate.
        lr_scheduler_type (`str`, *optional*, defaults to `"constant"`):
            Learning-rate schedule; the released script keeps it constant (transformers' default is `"linear"`).
        weight_decay (`float`, *optional*, defaults to `1e-4`):
            AdamW weight decay.
        max_grad_norm (`float`, *optional*, defaults to `1.0`):
            Gradient-norm clipping of each round's step.
        per_device_train_batch_size (`int`, *optional*, defaults to `3`):
            Prompts per task, device and round.

        > Parameters that control evaluation

        eval_rewards (`dict[str, list[str]]`, `str` or `None`, *optional*):
            Rewards of the student's samples every `eval_steps`, logged as `rewards/{task}/{reward}` with an image
            grid: `{task: [reward, ...]}`, `"a,b"` for every task, or `""` for grids only. `None` disables it.

        > Parameters that control the EMA of the student

        ema (`bool`, *optional*, defaults to `True`):
            Keep an exponential moving average of the student LoRA; saved adapters and evaluations use it.
        ema_decay (`float`, *optional*, defaults to `0.9`):
            EMA decay.
        ema_update_interval (`int`, *optional*, defaults to `8`):
            Update the EMA every this many optimizer steps.
    """

    _VALID_DICT_FIELDS = DiffusionTrainingConfig._VALID_DICT_FIELDS + ["teacher_guidance_scale", "task_weights"]

    # Parameters whose default values are overridden from DiffusionTrainingConfig
    per_device_train_batch_size: int = field(
        default=3, metadata={"help": "Prompts per task, per device and per round."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X rounds."})

    # Parameters that control the model
    teacher_offload: bool = field(
        default=False, metadata={"help": "Keep full-weight teachers on the CPU between their calls."}
    )

    # Parameters that control the rollout
    teacher_guidance_scale: dict | str | float | None = field(
        default=None, metadata={"help": "Teacher CFG scale: one value or a dict (or JSON string) task -> scale."}
    )

    # Parameters that control the loss
    loss_type: str = field(default="kl", metadata={"help": "Loss.", "choices": ["kl", "ppo"]})
    kl_normalization: str = field(
        default="reference", metadata={"help": "KL normalisation.", "choices": list(KL_NORMALIZATIONS)}
    )
    task_weights: dict | str | None = field(
        default=None, metadata={"help": "Weight of each task's loss, a dict (or JSON string)."}
    )
    ppo_clip_range: float | None = field(default=None, metadata={"help": "PPO clip range with loss_type='ppo'."})

    def __post_init__(self):
        self.task_weights = _as_dict(self.task_weights, "task_weights")
        if isinstance(self.teacher_guidance_scale, str):
            try:
                self.teacher_guidance_scale = float(self.teacher_guidance_scale)
            except ValueError:
                self.teacher_guidance_scale = _as_dict(self.teacher_guidance_scale, "teacher_guidance_scale")
        super().__post_init__()

        if self.kl_normalization not in KL_NORMALIZATIONS:
            raise ValueError(f"`kl_normalization` must be one of {KL_NORMALIZATIONS}, got {self.kl_normalization!r}.")
        if self.loss_type not in ("kl", "ppo"):
            raise ValueError(f"`loss_type` must be 'kl' or 'ppo', got {self.loss_type!r}.")
        if self.loss_type == "ppo" and self.noise_level == 0:
            raise ValueError(
                "`loss_type='ppo'` needs a stochastic sampler: set `noise_level > 0` (the ODE has no log-probability)."
            )
        for name, weight in (self.task_weights or {}).items():
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"`task_weights['{name}']` must be a non-negative number, got {weight!r}.")

    def teacher_guidance_for(self, task: str) -> float:
        """CFG scale of `task`'s teacher when its spec sets none."""
        value = self.teacher_guidance_scale
        if isinstance(value, dict):
            return float(value.get(task, self.guidance_scale))
        return float(self.guidance_scale if value is None else value)
