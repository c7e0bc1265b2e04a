"""Configuration of the `DiffusionOPDTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..transition import KL_NORMALIZATIONS
from .base_config import DiffusionTrainingConfig
from .config_checks import _as_dict, check_bool, check_choice, check_int, check_number


@dataclass
class DiffusionOPDConfig(DiffusionTrainingConfig):
    r"""
    Configuration class for the [`DiffusionOPDTrainer`].

    This class includes only the parameters that are specific to DiffusionOPD training; the shared ones are
    [`DiffusionTrainingConfig`]'s and the rest [`~transformers.TrainingArguments`]'. Each field is documented by its
    `help` (what `--help` prints and the API reference renders), in groups: the model, the rollout, the loss.

    Defaults follow the paper's released recipe for SD3.5-Medium (`config/opd.py::mopd` and `scripts/train_sd3_opd.py`
    of the DiffusionOPD release) and may differ from those of [`~transformers.TrainingArguments`]: AdamW at a constant
    lr 3e-4 (weight decay 1e-4, clipping 1.0), T5 prompts of 128 tokens, the 10-step ODE rollout (noise level 0) at
    512 px with student CFG 4.5, the first ⌊0.99·N⌋ steps trained, 3 prompts per task and round, EMA 0.9 every 8
    rounds, seed 42.

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
        default=3, metadata={"help": "Prompts per task, per device and per round (the released recipe: 3)."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log the metrics every this many rounds."})

    # Parameters that control the model
    teacher_offload: bool = field(
        default=False,
        metadata={
            "help": "Keep full-weight teachers on the CPU between their calls, so that M full teachers cost one "
            "resident copy at a time on the accelerator (LoRA teachers share the base and need no offload)."
        },
    )

    # Parameters that control the rollout
    teacher_guidance_scale: dict | str | float | None = field(
        default=None,
        metadata={
            "help": "Teacher CFG scale, one value or one per task (a dict, or a JSON string on the command line, "
            'e.g. {"geneval": 1.0, "ocr": 4.5}); a teacher spec\'s own `guidance_scale` wins. None uses '
            "`guidance_scale`."
        },
    )
    teacher_guidance_scale_2: dict | str | float | None = field(
        default=None,
        metadata={
            "help": "Two-expert pipelines (Wan 2.2 A14B) only: the teachers' CFG scale at the low-noise expert's "
            "steps, one value or one per task; a spec's `guidance_scale_2` wins. None uses `guidance_scale_2`, and "
            "when that is None too, the teacher's own `guidance_scale`, as `WanPipeline` does."
        },
    )

    # Parameters that control the loss
    loss_type: str = field(
        default="kl",
        metadata={
            "help": "Training objective: 'kl', the closed-form per-step reverse KL to the teacher, or 'ppo', the "
            "paper's PPO-style ablation (needs noise_level > 0).",
            "choices": ["kl", "ppo"],
        },
    )
    kl_normalization: str = field(
        default="reference",
        metadata={
            "help": "Normalisation of the per-step KL: 'reference', the per-element mean divided by sigma_t^2 (the "
            "released code's convention, so that published hyper-parameters transfer), or 'paper', the sum over "
            "elements divided by the transition variance (Eq. 11 of the paper).",
            "choices": list(KL_NORMALIZATIONS),
        },
    )
    task_weights: dict | str | None = field(
        default=None,
        metadata={
            "help": "Weight of each task's loss, a dict (or JSON string) task -> weight; missing tasks weigh 1."
        },
    )
    task_timestep_fraction: dict | str | None = field(
        default=None,
        metadata={
            "help": "Per-task `timestep_fraction`, a dict (or JSON string) task -> fraction in (0, 1]: a task's rows "
            "are supervised on its first floor(N * fraction) sampler steps only (missing tasks use "
            "`timestep_fraction`). Give a teacher the steps it was trained on: an RL teacher trained on the "
            "high-noise steps only (e.g. timestep_fraction=0.5) changes the low-noise steps too, untrained, and "
            "distilling those steps pulls the student where no reward asked it to go."
        },
    )
    task_prompt_templates: dict | str | None = field(
        default=None,
        metadata={
            "help": "The prompt the student sees for a task's rows, a dict (or JSON string) task -> template with "
            '\'{prompt}\' (e.g. {"aesthetic": "{prompt}, pretty"}); the task\'s teachers always see the prompt as '
            "written. On a prompt shared by two tasks the student otherwise learns the teachers' weighted mean. "
            "Sample the student with the same template; the model card lists it."
        },
    )
    ppo_clip_range: float | None = field(
        default=None,
        metadata={"help": "PPO clipping range of the importance ratio with loss_type='ppo'; None does not clip."},
    )
    step_batch_size: int | str | None = field(
        default=None,
        metadata={
            "help": "Trained steps evaluated together in one teacher / student call (rows = steps x prompts). None "
            "batches all trained steps; lower it to bound activation memory. 'auto': the largest number whose saved "
            "activations (measured once, by one student pass of one prompt) fit in 80 percent of the free device "
            "memory (RAM on a CPU), chosen at the first round and logged in one line."
        },
    )
    fused_rollout: bool = field(
        default=True,
        metadata={
            "help": "At the trained steps, the rollout's own student forward (with grad) is the student's pass of the "
            "loss: the next state is drawn from the detached mean, so the gradient equals the two-pass loop's at T "
            "fewer student forwards per task, and the steps after the last trained one are not sampled. Activation "
            "memory is unchanged; evaluation always uses the no-grad rollout."
        },
    )

    # Parameters that control the round and how the teachers are queried (defaults: the paper's recipe)
    tasks_per_round: int | None = field(
        default=None,
        metadata={
            "help": "None: a round visits every task, each with its own rollout batch of `per_device_train_batch_size` "
            "prompts (round-robin, the paper's recipe). An integer k: a mixed-task round draws k tasks (`task_sampling`)"
            ", rolls their `rows_per_round` rows out together and supervises each row by its own task's teachers, one "
            "teacher pass per adapter, so a round's cost follows the rows, not the number of tasks."
        },
    )
    rows_per_round: int | None = field(
        default=None,
        metadata={
            "help": "Rows per device of a mixed-task round (`tasks_per_round` set), split evenly over its tasks; None: "
            "`per_device_train_batch_size` x `tasks_per_round`."
        },
    )
    task_sampling: str = field(
        default="uniform",
        metadata={
            "help": "How a mixed-task round draws its tasks (without replacement): 'uniform', with each row's loss "
            "weighted by its `task_weights`, or 'weighted', drawn with probability proportional to `task_weights` "
            "and then unweighted (the same objective in expectation, no round spent on a light task).",
            "choices": ["uniform", "weighted"],
        },
    )
    max_teachers_on_device: int | None = field(
        default=None,
        metadata={
            "help": "Most LoRA teachers whose weights are on the accelerator at once; the others wait on the host and "
            "are copied in on use, the least recently used one leaving (its host copy stays exact: teachers are "
            "frozen). None keeps every teacher on the device. Results are identical either way."
        },
    )
    query_mode: str = field(
        default="dense",
        metadata={
            "help": "'dense': the closed-form per-step KL at every trained state (the paper). 'single': one state per "
            "trajectory, drawn uniformly among the trained sampler states with sigma in `query_sigma_range`, "
            "supervised by the velocity MSE to the teacher (DanceOPD's form): one teacher and one student pass per "
            "row instead of one per trained step.",
            "choices": ["dense", "single"],
        },
    )
    query_sigma_range: str | None = field(
        default=None,
        metadata={
            "help": "With query_mode='single': the noise range [low, high] (a list, or 'low,high' on the command line) "
            "of the queried states; None: [0, 0.5], the low-noise half of the schedule."
        },
    )
    anchor_teacher: str | dict | None = field(
        default=None,
        metadata={
            "help": "A task-agnostic teacher mixed into every row's supervision with weight `anchor_weight` (Flow-OPD): "
            "'base', the base model itself at the teachers' CFG, or a teacher spec (a folder, a Hub id, a registered "
            'name, or a JSON dict with `path` and `guidance_scale`, e.g. {"path": "base", "guidance_scale": 4.5}). '
            "None: no anchor."
        },
    )
    anchor_weight: float = field(
        default=0.1,
        metadata={
            "help": "The anchor's share of every row's teacher weight, in (0, 1); the row's own teachers share the rest "
            "in their weights' proportions."
        },
    )
    guidance_free_student: bool = field(
        default=False,
        metadata={
            "help": "Distil the teachers' CFG into the student: the student rolls out and is trained without CFG "
            "(its `guidance_scale` becomes 1), the teachers keep theirs (`teacher_guidance_scale`, by default the "
            "`guidance_scale` given). Sample the result with guidance_scale=1; the model card's quick start does."
        },
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
        check_int("tasks_per_round", self.tasks_per_round, 1, optional=True)
        check_int("rows_per_round", self.rows_per_round, 1, optional=True)
        if self.rows_per_round is not None and self.tasks_per_round is None:
            raise ValueError("`rows_per_round` applies to mixed-task rounds: set `tasks_per_round` too.")
        if self.tasks_per_round is not None and self.rows_per_round is not None:
            if self.rows_per_round < self.tasks_per_round:
                raise ValueError(
                    f"`rows_per_round` ({self.rows_per_round}) must be at least `tasks_per_round` "
                    f"({self.tasks_per_round}): every task drawn gets a row."
                )
        check_choice("task_sampling", self.task_sampling, ("uniform", "weighted"))
        check_int("max_teachers_on_device", self.max_teachers_on_device, 1, optional=True)
        check_choice("query_mode", self.query_mode, ("dense", "single"))
        low, high = self.query_sigma_bounds
        if not 0 <= low < high <= 1:
            raise ValueError(
                f"`query_sigma_range` must be [low, high] with 0 <= low < high <= 1, got [{low}, {high}]."
            )
        if self.query_mode == "single" and self.loss_type != "kl":
            raise ValueError("`query_mode='single'` has its own loss (velocity MSE): leave `loss_type='kl'`.")
        if isinstance(self.anchor_teacher, str) and self.anchor_teacher.strip().startswith("{"):
            self.anchor_teacher = _as_dict(self.anchor_teacher, "anchor_teacher")
        check_number("anchor_weight", self.anchor_weight, 0, 1, low_open=True, high_open=True)
        check_bool("guidance_free_student", self.guidance_free_student)
        if self.guidance_free_student:
            # The teachers keep the CFG given; the student's becomes 1. Idempotent, so a saved config reloads as is.
            if self.teacher_guidance_scale is None:
                self.teacher_guidance_scale = self.guidance_scale
            if self.teacher_guidance_scale_2 is None and self.guidance_scale_2 is not None:
                self.teacher_guidance_scale_2 = self.guidance_scale_2
            self.guidance_scale = 1.0
            self.guidance_scale_2 = None
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

    @property
    def query_sigma_bounds(self) -> tuple[float, float]:
        """`query_sigma_range` as `(low, high)` (default `(0, 0.5)`)."""
        value = self.query_sigma_range
        if value is None:
            return 0.0, 0.5
        parts = value.split(",") if isinstance(value, str) else list(value)
        try:
            low, high = (float(part) for part in parts)
        except (TypeError, ValueError):
            raise ValueError(f"`query_sigma_range` must be two numbers [low, high], got {value!r}.") from None
        return low, high

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
