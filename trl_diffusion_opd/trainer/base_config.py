"""`DiffusionTrainingConfig`: the training arguments every trainer of the package shares. The reward-driven Stage-1
trainers add theirs in `rl_config.py`; each method's own config is `<method>_config.py`."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from ..sizes import RESOLUTION_HELP, ResolutionLike, parse_resolution
from ..transition import SAMPLERS
from .checkpointing import check_checkpoint
from .config_checks import (
    _as_dict,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_output_dir,
    check_reward_names,
)


TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _parse_eval_rewards(value: Any) -> Any:
    """`eval_rewards` with a JSON string parsed, checked to be `None`, `"a,b"`, a list of names or
    `{task: name or [names]}` of registered rewards (`Reward` objects and functions pass through)."""
    from ..rewards import load_reward_spec, parse_reward_spec

    value = load_reward_spec(value, "eval_rewards")
    if value is None:
        return None
    spec = parse_reward_spec(value, "eval_rewards")
    names = [item for items in spec.values() for item in items] if isinstance(spec, dict) else spec
    check_reward_names("eval_rewards", names)
    return value


@dataclass
class DiffusionTrainingConfig(TrainingArguments):
    r"""
    Arguments shared by every trainer of the package: a LoRA student on a frozen flow-matching pipeline.

    The optimisation defaults are those every released SD3.5-Medium script shares (DiffusionOPD's
    `train_sd3_opd.py`, Flow-GRPO's `train_sd3.py`, DiffusionNFT's `train_nft_sd3.py`): AdamW (β = 0.9, 0.999,
    ε = 1e-8) with lr 3e-4, weight decay 1e-4, gradient clipping 1.0, a *constant* learning rate (the scripts build no
    scheduler, so `lr_scheduler_type` is `"constant"` here, not transformers' `"linear"`), no warm-up, seed 42, T5
    prompts of 128 tokens, 10 sampler steps at 512 px, and an EMA of decay 0.9.

    Each field is documented once, by its `help` (what `--help` prints and the API reference renders), in groups:
    the model, sampling, evaluation and the EMA of the student. Subclasses (`DiffusionOPDConfig`,
    `FlowGRPOConfig`, `DiffusionNFTConfig`) document only the defaults they change; see
    [`~transformers.TrainingArguments`] for the rest.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["eval_rewards", "family_kwargs"]

    # Parameters whose default values are overridden from TrainingArguments
    learning_rate: float = field(
        default=3e-4,
        metadata={"help": "Initial learning rate of AdamW; 3e-4 is the released SD3.5-Medium scripts' value."},
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule; the released scripts build no scheduler, so the default keeps the rate "
            "constant (transformers' default is 'linear')."
        },
    )
    weight_decay: float = field(
        default=1e-4, metadata={"help": "Weight decay of AdamW; the released scripts use 1e-4."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient-norm clipping at each optimizer step; the released scripts use 1.0."}
    )
    per_device_train_batch_size: int = field(
        default=3,
        metadata={"help": "Prompts per task, per device and per optimizer step (not images: a prompt's rows follow)."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log the metrics every this many optimizer steps."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep every dataset column, so that a prompt's metadata reaches the rewards and routing."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint folder to resume from; `true`: the last complete checkpoint of output_dir (an error "
            "when there is none); `auto`: the same, or start the run when there is none (for requeued jobs)."
        },
    )

    # Parameters that control the model
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the pipeline when `model` is a Hub id or a path; the student LoRA parameters are "
            "always kept in float32.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    max_sequence_length: int | None = field(
        default=128,
        metadata={
            "help": "Length of the T5 prompt embeddings (the released scripts' 128); None uses the pipeline's "
            "default (256 for SD3, 512 for FLUX)."
        },
    )
    revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of the base model when it is a Hub id."}
    )
    student_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Existing LoRA to continue from instead of a fresh one: a local folder or a Hub spec, in "
            "diffusers or PEFT format."
        },
    )
    offload_text_encoders: bool = field(
        default=True,
        metadata={
            "help": "When every training and evaluation prompt fits in the prompt cache, embed them all before "
            "training and move the text encoders to the CPU (SD3.5's T5-XXL alone is ~9 GB in bf16)."
        },
    )
    prompt_cache_size: int = field(
        default=1024,
        metadata={
            "help": "Number of prompt embeddings kept on the device, least recently used evicted, so that the text "
            "encoders run once per prompt."
        },
    )
    family_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Options of the model family (its `FlowMatchingFamily.options()`), e.g. {"cfg_truncation": '
            '0.9, "cfg_normalization": true} for Z-Image; a JSON string on the command line. The family checks '
            "them when the pipeline is loaded: an option it does not have is an error."
        },
    )

    # Parameters that control sampling
    num_inference_steps: int = field(
        default=10, metadata={"help": "Number of sampler steps N of the rollout (the released recipes use 10)."}
    )
    noise_level: float = field(
        default=0.0,
        metadata={"help": "Noise level a of the SDE sampler; 0.0 uses the deterministic ODE sampler."},
    )
    sde_type: str = field(
        default="sde",
        metadata={
            "help": "Stochastic sampler when noise_level > 0: 'sde' (Flow-GRPO's Euler-Maruyama step) or 'cps' "
            "(coefficient-preserving).",
            "choices": list(SAMPLERS),
        },
    )
    guidance_scale: float = field(
        default=4.5,
        metadata={
            "help": "Student CFG scale, used in the rollout and in the loss (the gradient flows through both CFG "
            "branches); the SD3.5-Medium recipes use 4.5."
        },
    )
    guidance_scale_2: float | None = field(
        default=None,
        metadata={
            "help": "Two-expert pipelines (Wan 2.2 A14B) only: the student's CFG scale at the low-noise expert's "
            "steps, as `WanPipeline`'s `guidance_scale_2`; None uses `guidance_scale`."
        },
    )
    negative_prompt: str = field(default="", metadata={"help": "Prompt of the unconditional CFG branch."})
    resolution: ResolutionLike = field(
        default=512,
        metadata={"help": RESOLUTION_HELP},
    )
    num_frames: int | None = field(
        default=None,
        metadata={
            "help": "Video families only: frames per video (Wan: 1 + a multiple of 4); None uses the family's default."
        },
    )
    timestep_fraction: float = field(
        default=0.99,
        metadata={
            "help": "Train the first floor(N * timestep_fraction) sampler steps; the default 0.99 (the released "
            "recipes') skips the near-deterministic last step."
        },
    )
    step_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Trained steps evaluated together in one model call (rows = steps x prompts); None batches all "
            "of them, a lower value bounds activation memory."
        },
    )

    # Parameters that control evaluation
    eval_rewards: dict | str | None = field(
        default=None,
        metadata={
            "help": "Rewards of the student's samples every `eval_steps` (`RewardEvalCallback`), logged as "
            "rewards/{task}/{reward} with an image grid: {task: [reward, ...]}, 'a,b' for every task, or '' for "
            "grids only. None disables it."
        },
    )

    # Parameters that control the EMA
    ema: bool = field(
        default=True,
        metadata={
            "help": "Keep an exponential moving average of the student LoRA; saved adapters and evaluations use it."
        },
    )
    ema_decay: float = field(
        default=0.9,
        metadata={
            "help": "Decay of the EMA, from the first update (the released scripts use 0.9 after a warm-up of "
            "min((1 + k) / (10 + k), 0.9), which matters only for the first ~80 updates)."
        },
    )
    ema_update_interval: int = field(
        default=8, metadata={"help": "Update the EMA every this many optimizer steps (the released recipe: 8)."}
    )

    def __post_init__(self):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # Without this, transformers leaves a multi-process CPU launch undistributed and the ranks' students
            # silently drift apart.
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        # Before TrainingArguments, which would `json.loads` a "{..." string without naming the field.
        self.eval_rewards = _parse_eval_rewards(self.eval_rewards)
        self.family_kwargs = _as_dict(self.family_kwargs, "family_kwargs")
        super().__post_init__()
        self._check_training_arguments()

        check_choice("torch_dtype", self.torch_dtype, TORCH_DTYPES)
        check_int("max_sequence_length", self.max_sequence_length, 1, optional=True)
        check_int("prompt_cache_size", self.prompt_cache_size, 1)
        check_bool("offload_text_encoders", self.offload_text_encoders)
        check_bool("ema", self.ema)
        check_int("num_inference_steps", self.num_inference_steps, 1)
        check_number("noise_level", self.noise_level, 0)
        check_choice("sde_type", self.sde_type, SAMPLERS)
        check_number("guidance_scale", self.guidance_scale, 0)
        check_number("guidance_scale_2", self.guidance_scale_2, 0, optional=True)
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"`negative_prompt` must be a string, got {self.negative_prompt!r}.")
        # The family's latent layout (a multiple of 16 for SD3 and FLUX) is checked by the trainer once it knows it.
        self.resolution = parse_resolution(self.resolution)
        check_int("num_frames", self.num_frames, 1, optional=True)
        check_number("timestep_fraction", self.timestep_fraction, 0, 1, low_open=True)
        check_int("step_batch_size", self.step_batch_size, 1, optional=True)
        check_number("ema_decay", self.ema_decay, 0, 1, high_open=True)
        check_int("ema_update_interval", self.ema_update_interval, 1)

    def _check_training_arguments(self) -> None:
        """The `TrainingArguments` fields that this package relies on and that transformers does not check (a zero
        batch size divides by zero; a negative learning rate fails in torch only once the models are loaded)."""
        check_int("per_device_train_batch_size", self.per_device_train_batch_size, 1)
        check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        check_number("learning_rate", self.learning_rate, 0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_number("max_grad_norm", self.max_grad_norm, 0, optional=True)
        check_number("adam_beta1", self.adam_beta1, 0, 1, high_open=True)
        check_number("adam_beta2", self.adam_beta2, 0, 1, high_open=True)
        check_number("adam_epsilon", self.adam_epsilon, 0)
        if not isinstance(self.max_steps, numbers.Integral) or not (self.max_steps == -1 or self.max_steps >= 1):
            raise ValueError(
                f"`max_steps` must be an integer >= 1, or -1 to train for `num_train_epochs`, got {self.max_steps!r}."
            )
        if self.max_steps == -1:
            check_number("num_train_epochs", self.num_train_epochs, 0, low_open=True)
        seed = check_int("seed", self.seed, 0)
        if seed >= 2**32:
            raise ValueError(f"`seed` must be an integer in [0, 2**32), got {seed}.")
        check_output_dir("output_dir", self.output_dir)
        resume = self.resume_from_checkpoint
        if isinstance(resume, (str, os.PathLike)) and str(resume).lower() not in ("true", "false", "auto"):
            check_checkpoint(resume)

    @property
    def num_train_timesteps(self) -> int:
        """Number T of trained sampler steps, ⌊N·timestep_fraction⌋ but at least 1."""
        return max(1, int(self.num_inference_steps * self.timestep_fraction))
