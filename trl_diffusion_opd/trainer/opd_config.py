"""Configuration of the `DiffusionOPDTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..transition import KL_NORMALIZATIONS
from .base_config import DiffusionTrainingConfig, _as_dict, check_bool, check_choice, check_number


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
        teacher_guidance_scale_2 (`float`, `dict[str, float]` or `None`, *optional*):
            Two-expert pipelines (Wan 2.2 A14B) only: the teachers' CFG scale at the low-noise expert's steps, one
            value or one per task; a spec's `guidance_scale_2` wins. `None` uses `guidance_scale_2` (like
            `teacher_guidance_scale` falls back to `guidance_scale`), and when that is `None` too, the teacher's own
            `guidance_scale`, as `WanPipeline` does.
        negative_prompt (`str`, *optional*, defaults to `""`):
            Prompt of the unconditional CFG branch.
        resolution (`int`, *optional*, defaults to `512`):
            Image side in pixels, a multiple of the family's `resolution_multiple` (16 for SD3 and FLUX: the VAE's 8×
            times the 2×2 latent patch), checked once the pipeline is loaded.
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
        task_timestep_fraction (`dict[str, float]` or `None`, *optional*):
            Per-task `timestep_fraction`: a task's rows are supervised on its first ⌊N·fraction⌋ sampler steps only
            (missing tasks use `timestep_fraction`). Give a teacher the steps it was trained on: an RL teacher
            trained on the high-noise steps only (e.g. `timestep_fraction=0.5`) changes the low-noise steps too,
            untrained, and distilling those steps pulls the student where no reward asked it to go.
        task_prompt_templates (`dict[str, str]` or `None`, *optional*):
            The prompt the *student* sees for a task's rows, as a template with `{prompt}` (e.g.
            `{"aesthetic": "{prompt}, pretty"}`); the task's teachers always see the prompt as written. Tasks whose
            prompt sets overlap but whose teachers want different images need it: on a prompt shared by two tasks
            the student otherwise receives both teachers' targets and learns their weighted mean. Sample the student with
            the same template; the model card lists it. (On the world, tagging a task this way did not help: see the
            README's "Several teachers, one student".)
        ppo_clip_range (`float` or `None`, *optional*, defaults to `None`):
            PPO clipping range of the importance ratio with `loss_type="ppo"`.
        step_batch_size (`int`, `"auto"` or `None`, *optional*, defaults to `None`):
            Trained steps evaluated together in one teacher / student call (rows = steps × prompts). `None`
            batches all trained steps; lower it to bound activation memory. `"auto"`: the largest number whose saved
            activations (measured once, by one student pass of one prompt) fit in 80% of the free device memory
            (RAM on a CPU), chosen at the first round and logged in one line.
        fused_rollout (`bool`, *optional*, defaults to `True`):
            At the trained steps, the rollout's own student forward (with grad) is the student's pass of the loss:
            x_{j+1} is drawn from the detached mean μ_S(x_j), so the gradient equals the two-pass loop's (a no-grad
            rollout, then the student recomputed at the stored states), at T fewer student forwards per task; the
            steps after the last trained one, which the loss never reads, are not sampled. The student then runs B
            rows per call instead of `step_batch_size` × B; activation memory is unchanged (the graphs of one chunk
            of `step_batch_size` steps live until its backward). Evaluation always uses the no-grad rollout.

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

        eval_strategy, eval_steps, per_device_eval_batch_size, metric_for_best_model, greater_is_better:
            transformers' periodic evaluation: every `eval_steps` rounds (`"steps"`) or after every epoch, one pass
            over the largest task's prompts (`"epoch"`), `evaluate()` reports the KL to each teacher on the held-out
            prompts (`eval_dataset`), in batches of `per_device_eval_batch_size`, as `eval_kl/{task}`, their mean
            `eval_kl` and the training objective `eval_loss`. `metric_for_best_model` may name any of them
            (`load_best_model_at_end` restores that checkpoint's student and EMA); `greater_is_better` defaults to
            `False`.
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

    _VALID_DICT_FIELDS = DiffusionTrainingConfig._VALID_DICT_FIELDS + [
        "teacher_guidance_scale",
        "teacher_guidance_scale_2",
        "task_weights",
        "task_prompt_templates",
        "task_timestep_fraction",
    ]

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
    teacher_guidance_scale_2: dict | str | float | None = field(
        default=None,
        metadata={"help": "Two-expert pipelines (Wan 2.2): teacher CFG scale of the low-noise expert, as above."},
    )

    # Parameters that control the loss
    loss_type: str = field(default="kl", metadata={"help": "Loss.", "choices": ["kl", "ppo"]})
    kl_normalization: str = field(
        default="reference", metadata={"help": "KL normalisation.", "choices": list(KL_NORMALIZATIONS)}
    )
    task_weights: dict | str | None = field(
        default=None, metadata={"help": "Weight of each task's loss, a dict (or JSON string)."}
    )
    task_timestep_fraction: dict | str | None = field(
        default=None,
        metadata={"help": "Per-task timestep_fraction, a dict (or JSON string) task -> fraction in (0, 1]."},
    )
    task_prompt_templates: dict | str | None = field(
        default=None,
        metadata={
            "help": "Prompt the student sees per task, a dict (or JSON string) task -> template with '{prompt}'; "
            "teachers see the prompt as written."
        },
    )
    ppo_clip_range: float | None = field(default=None, metadata={"help": "PPO clip range with loss_type='ppo'."})
    step_batch_size: int | str | None = field(
        default=None,
        metadata={"help": "Trained steps per model call; None batches all of them; 'auto' fits them to free memory."},
    )
    fused_rollout: bool = field(
        default=True,
        metadata={"help": "Train on the rollout's own student forward at trained steps (no second student pass)."},
    )

    def __post_init__(self):
        self.task_weights = _as_dict(self.task_weights, "task_weights")
        self.task_prompt_templates = _as_dict(self.task_prompt_templates, "task_prompt_templates")
        self.task_timestep_fraction = _as_dict(self.task_timestep_fraction, "task_timestep_fraction")
        for name in ("teacher_guidance_scale", "teacher_guidance_scale_2"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    if not value.strip().startswith("{"):
                        raise ValueError(f"`{name}` must be a number or {{task: number}}, got {value!r}.") from None
                    setattr(self, name, _as_dict(value, name))
        # "auto" is resolved by the trainer (`_chunks`); the shared checks see an integer or None.
        if isinstance(self.step_batch_size, str) and self.step_batch_size.strip().lower() != "auto":
            try:
                self.step_batch_size = int(self.step_batch_size)
            except ValueError:
                raise ValueError(
                    f"`step_batch_size` must be a positive integer, 'auto' or None, got {self.step_batch_size!r}."
                ) from None
        auto = isinstance(self.step_batch_size, str)
        if auto:
            self.step_batch_size = None
        # Every metric of `evaluate()` (`kl`, `kl/<task>`, `loss`) is better lower; transformers' default would take
        # the highest KL as the best model.
        best = self.metric_for_best_model is not None or self.load_best_model_at_end
        if self.greater_is_better is None and best:
            self.greater_is_better = False
        super().__post_init__()
        if auto:
            self.step_batch_size = "auto"

        check_bool("teacher_offload", self.teacher_offload)
        check_bool("fused_rollout", self.fused_rollout)
        check_choice("loss_type", self.loss_type, ("kl", "ppo"))
        check_choice("kl_normalization", self.kl_normalization, KL_NORMALIZATIONS)
        if self.loss_type == "ppo" and self.noise_level == 0:
            raise ValueError(
                "`loss_type='ppo'` needs a stochastic sampler: set `noise_level > 0` (the ODE has no log-probability)."
            )
        check_number("ppo_clip_range", self.ppo_clip_range, 0, low_open=True, optional=True)
        for name in ("teacher_guidance_scale", "teacher_guidance_scale_2"):
            value = getattr(self, name)
            if isinstance(value, dict):
                for task, scale in value.items():
                    check_number(f"{name}['{task}']", scale, 0)
            else:
                check_number(name, value, 0, optional=True)
        # Missing tasks weigh 1; that some task keeps a weight > 0 is checked by the trainer, which knows the tasks.
        for task, weight in (self.task_weights or {}).items():
            check_number(f"task_weights['{task}']", weight, 0)
        for task, fraction in (self.task_timestep_fraction or {}).items():
            check_number(f"task_timestep_fraction['{task}']", fraction, 0, 1, low_open=True)
        for task, template in (self.task_prompt_templates or {}).items():
            if not isinstance(template, str) or "{prompt}" not in template:
                raise ValueError(
                    f"`task_prompt_templates['{task}']` must be a string containing '{{prompt}}', got {template!r}."
                )
            try:
                template.format(prompt="")
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    f"`task_prompt_templates['{task}']` ({template!r}) has a placeholder other than '{{prompt}}' "
                    f"({error!r}); double braces write a literal brace."
                ) from None

    def train_timesteps_for(self, task: str) -> int:
        """Trained sampler steps T of `task`'s rows: ⌊N·fraction⌋ (at least 1) with its `task_timestep_fraction`."""
        fraction = (self.task_timestep_fraction or {}).get(task)
        if fraction is None:
            return self.num_train_timesteps
        return max(1, int(self.num_inference_steps * fraction))

    def student_prompt(self, task: str, prompt: str) -> str:
        """The prompt the student sees for a row of `task` (`task_prompt_templates`; unchanged without one)."""
        template = (self.task_prompt_templates or {}).get(task)
        return prompt if template is None else template.format(prompt=prompt)

    def teacher_guidance_for(self, task: str) -> float:
        """CFG scale of `task`'s teacher when its spec sets none."""
        value = self.teacher_guidance_scale
        if isinstance(value, dict):
            return float(value.get(task, self.guidance_scale))
        return float(self.guidance_scale if value is None else value)

    def teacher_guidance_2_for(self, task: str) -> float | None:
        """Low-noise-expert CFG scale of `task`'s teacher when its spec sets none (`None`: its `guidance_scale`)."""
        value = self.teacher_guidance_scale_2
        value = value.get(task) if isinstance(value, dict) else value
        value = self.guidance_scale_2 if value is None else value
        return None if value is None else float(value)
