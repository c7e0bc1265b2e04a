"""The paper's two-stage recipe on the tiny world, end to end on a CPU: the README's main job (`make demo`).

Stage 1 (shipped, or re-trained with `full=True`): one LoRA teacher per task, trained with the package's RL trainers
on its own rule-based reward (`trl_diffusion_opd.world.teachers`). Stage 2: `DiffusionOPDTrainer` distils the three
teachers into one LoRA student on the shipped base, each task's prompts supervised by that task's teacher. Then
every model is sampled on held-out scenes with the same seeds and scored with the three rewards, and the paper-style
table (rows: base, teachers, student; columns: the rewards and their average) and one image grid per model are
written by `trl_diffusion_opd.evaluation.evaluate_models`; `comparison.png` shows every model on the same held-out
prompts (`trl_diffusion_opd.figures.comparison_figure`) above the table; the student's model card carries that table and the base's and
student's grids (`write_student_card`).

The default is a quick run (30 rounds of 2 prompts per task, 32 held-out scenes per task); `DemoConfig(full=True)`
(`examples/demo.py --full`) gives the full-size table of docs/world.md (60 rounds of 4 prompts, 96 scenes per task).

```python
from trl_diffusion_opd.world.demo import DemoConfig, run_demo

result = run_demo(DemoConfig(output_dir="demo_output"))
print(result.to_markdown())
```
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .pipeline import MAX_SEQUENCE_LENGTH, load_world_pipeline
from .progress import PhaseProgress, set_progress
from .rewards import WORLD_TASK_REWARDS
from .scenes import IMAGE_SIZE, task_prompts


TEACHERS_DIR = Path(__file__).resolve().parent / "assets" / "teachers"
TASKS = tuple(WORLD_TASK_REWARDS)
# Held-out scenes come from another seed of the generator than the training scenes (the world has 216 prompts, so
# prompts repeat across the two sets; the scenes' layouts and the initial noise do not).
TRAIN_SEED, EVAL_SEED = 0, 1


# The full-size run of docs/world.md's table (`full=True`), and the quick default.
FULL_SIZE = {"rounds": 60, "prompts_per_task": 4, "learning_rate": 1e-3, "eval_images": 96}


@dataclass
class DemoConfig:
    """Settings of the demo (defaults: a quick run, about 5 minutes of one CPU core; see docs/world.md).

    Attributes:
        output_dir: Where the student adapter, `results.md` / `results.json`, `grids/*.png`, `comparison.png` and
            `demo.json` go.
        rounds: DiffusionOPD rounds (one optimizer step each, every task once).
        prompts_per_task: Prompts per task and round (`per_device_train_batch_size`).
        learning_rate: Student learning rate (constant).
        lora_rank: Student LoRA rank (alpha = rank).
        num_inference_steps: Sampler steps, for training and evaluation (10 is as good as 20 in this world).
        eval_images: Held-out images per task for the table.
        figure_prompts: Held-out prompts per task shown in `comparison.png` (columns).
        teachers: `{task: folder}`; `None` reads the shipped teachers (`assets/teachers/index.json`).
        full: The full-size table: `FULL_SIZE` (60 rounds of 4 prompts, 96 scenes per task) replaces `rounds`,
            `prompts_per_task`, `learning_rate` and `eval_images`.
        retrain_teachers: Re-train the three teachers first (`world.teachers.train_world_teacher`); implies
            `multitask_baseline`.
        multitask_baseline: Add the paper's multi-task RL row: one LoRA trained with DiffusionNFT on every task's
            prompts, each rewarded by its own task's reward (`world.teachers.train_multitask_world_baseline`).
        teacher_steps: Optimizer steps of each re-trained teacher and of the baseline (`None`: the recipe's).
        seed: Seed of the student's initialisation and of the rollouts.
        num_threads: Torch threads (`None` leaves torch's default).
        progress: Progress bars (one per phase).
        task_timestep_fraction: `{task: fraction}` of the sampler steps each task is supervised on; `None` gives
            each task the steps its teacher's recipe trained (`world.teachers.RECIPES`: the composition teacher was
            trained on the first half only, and distilling its untrained low-noise steps costs the aesthetic task
            a third of its gain; docs/world.md, "Several teachers, one student"); `{}` supervises every task on
            every step.
        extra: More `DiffusionOPDConfig` fields of the student's training; they override the demo's own.
    """

    output_dir: str = "demo_output"
    rounds: int = 30
    prompts_per_task: int = 2
    learning_rate: float = 2e-3
    lora_rank: int = 16
    num_inference_steps: int = 10
    eval_images: int = 32
    figure_prompts: int = 2
    teachers: dict[str, str] | None = None
    full: bool = False
    retrain_teachers: bool = False
    multitask_baseline: bool = False
    teacher_steps: int | None = None
    seed: int = 0
    num_threads: int | None = None
    progress: bool = True
    task_timestep_fraction: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.full:
            for name, value in FULL_SIZE.items():
                setattr(self, name, value)


def shipped_teachers(folder: str | Path | None = None) -> dict[str, str]:
    """`{task: adapter folder}` of the teachers shipped with the package (written by `world teachers`).

    Raises:
        FileNotFoundError: no `index.json` (the teachers were not trained or not installed).
    """
    folder = Path(folder) if folder is not None else TEACHERS_DIR
    index = folder / "index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"No world teachers in {folder} (no index.json); train them with `trl-diffusion-opd world teachers`."
        )
    entries = json.loads(index.read_text())
    return {task: str(folder / entry["folder"]) for task, entry in entries.items()}


def train_rows(task: str, count: int, seed: int = TRAIN_SEED) -> list[dict]:
    return task_prompts(task, count, seed)


def eval_prompts(count: int, seed: int = EVAL_SEED) -> dict[str, list[dict]]:
    """Held-out prompt rows per reward column of the table (`{reward name: rows}`)."""
    return {reward: task_prompts(task, count, seed) for task, reward in WORLD_TASK_REWARDS.items()}


def distil(teachers: dict[str, str], config: DemoConfig, output_dir: str | Path):
    """Stage 2: DiffusionOPD of `teachers` into one student on the shipped base. Returns the trained trainer (its
    student adapter saved in `output_dir`)."""
    trainer = student_trainer(teachers, config, output_dir)
    trainer.train()
    trainer.save_model(str(output_dir))
    return trainer


def teacher_step_fractions(teachers: dict[str, str], fractions: dict[str, float] | None = None) -> dict | None:
    """`task_timestep_fraction` of the student: `fractions`, or (when `None`) the `timestep_fraction` each world
    task's teacher recipe trained with (the shipped and re-trained teachers follow the recipes)."""
    if fractions is None:
        from .teachers import RECIPES

        fractions = {task: RECIPES[task].timestep_fraction for task in teachers if task in RECIPES}
    return dict(fractions) or None


def student_trainer(
    teachers: dict[str, str], config: DemoConfig, output_dir: str | Path, rows: dict[str, list[dict]] | None = None
):
    """The `DiffusionOPDTrainer` of `distil`, not yet trained (add callbacks to it, then `train()`). `rows`: each
    task's training prompt rows (default: 64 of the world task named like the task)."""
    from peft import LoraConfig

    from .. import DiffusionOPDConfig, DiffusionOPDTrainer

    settings = {
        "output_dir": str(output_dir),
        "max_steps": config.rounds,
        "per_device_train_batch_size": config.prompts_per_task,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": "constant",
        "resolution": IMAGE_SIZE,
        "num_inference_steps": config.num_inference_steps,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "guidance_scale": 1.0,
        "teacher_guidance_scale": 1.0,
        "noise_level": 0.0,  # the ODE sampler: the paper's fastest-converging setting
        "ema": False,
        "save_strategy": "no",
        "logging_steps": max(1, config.rounds // 6),
        "report_to": "none",
        "disable_tqdm": not config.progress,
        "seed": config.seed,
        "use_cpu": not torch.cuda.is_available(),
        "task_timestep_fraction": teacher_step_fractions(teachers, config.task_timestep_fraction),
    }
    args = DiffusionOPDConfig(**{**settings, **config.extra})  # `extra` may override any of them
    pipe = load_world_pipeline()
    rows = rows if rows is not None else {task: train_rows(task, 64) for task in teachers}
    peft_config = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian", target_modules=_targets()
    )
    trainer = DiffusionOPDTrainer(pipe, teachers, args=args, train_dataset=rows, peft_config=peft_config)
    set_progress(trainer, config.progress, PhaseProgress("DiffusionOPD"))  # one bar with the KL to each teacher
    return trainer


def _targets() -> list[str]:
    from ..families.sd3 import SD3Family

    return list(SD3Family.default_lora_targets)


def evaluate(adapters: dict[str, str], config: DemoConfig, output_dir: str | Path):
    """Sample the base and every adapter on the held-out scenes (same seeds for all) and score all three rewards.

    Returns:
        The `EvaluationResult` (table, per-model scores); `results.md`, `results.json` and `grids/` are written.
    """
    from ..evaluation import evaluate_models

    pipe = load_world_pipeline()
    return evaluate_models(
        pipe,
        eval_prompts(config.eval_images),
        adapters=adapters,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=1.0,
        resolution=IMAGE_SIZE,
        seed=10_000,
        batch_size=max(1, config.eval_images),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        grid_size=max(8, config.figure_prompts),
        grid_image_size=96,
        output_dir=output_dir,
        progress=config.progress,
    )


def write_student_card(
    trainer, result, student_label: str = "student: DiffusionOPD", base_label: str = "base"
) -> Path:
    """Rewrite the student's model card with the demo's table (base vs teachers vs student, `result`) and the base's
    and the student's grids as widget images (copied into `<student>/samples/`, which `push_to_hub` uploads).

    Returns:
        The card's path.
    """
    from trl_diffusion_opd.evaluation import SAMPLES_DIR

    folder = Path(trainer.args.output_dir)
    (folder / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    widgets = []
    for label in (base_label, student_label):
        grid = result.grids.get(label)
        if grid is not None:
            shutil.copy(grid, folder / SAMPLES_DIR / Path(grid).name)
            text = f"{label}: held-out scenes, a row per task ({', '.join(TASKS)})"
            widgets.append({"text": text, "url": f"{SAMPLES_DIR}/{Path(grid).name}"})
    trainer.sample_widgets = widgets
    trainer.model_card_results = result  # kept for later cards (`push_to_hub`)
    trainer.create_model_card(output_dir=str(folder))
    return folder / "README.md"


def write_comparison(result, config: DemoConfig, path: str | Path) -> Path:
    """`comparison.png`: the first `figure_prompts` held-out prompts of every task as columns, one row per model
    (the same seeds in every row), the table below."""
    from ..figures import comparison_figure

    count = config.figure_prompts
    prompts = [text for texts in result.sample_prompts for text in texts[:count]]
    rows = {label: [image for images in sets for image in images[:count]] for label, sets in result.samples.items()}
    figure = comparison_figure(rows, prompts, table=result.table_rows(digits=3), tile=96)
    figure.save(path)
    return Path(path)


def train_teachers(config: DemoConfig, folder: Path) -> dict[str, str]:
    """Stage 1 again (`full=True`): one teacher per task with `world.teachers`' recipe."""
    from .teachers import train_world_teacher

    kwargs = {} if config.teacher_steps is None else {"max_steps": config.teacher_steps}
    return {task: str(train_world_teacher(task, folder / task, seed=config.seed, **kwargs)) for task in TASKS}


def train_multitask_baseline(config: DemoConfig, folder: Path) -> str:
    """The paper's multi-task RL row: one LoRA trained with DiffusionNFT on every task's prompts, each prompt
    rewarded by its own task's reward (`world_task`), for the budget of one teacher."""
    from .teachers import train_multitask_world_baseline

    kwargs = {} if config.teacher_steps is None else {"max_steps": config.teacher_steps}
    return str(train_multitask_world_baseline(folder, seed=config.seed, **kwargs))


def run_demo(config: DemoConfig) -> Any:
    """Both stages and the evaluation (see the module docstring). Returns the `EvaluationResult`."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start, start_cpu = time.perf_counter(), time.process_time()
    if config.retrain_teachers:
        teachers = train_teachers(config, output_dir / "teachers")
        timings["stage1_teachers_s"] = time.perf_counter() - start
    else:
        # The shipped teachers by their registered names (`world:<task>`), as a reader of the card can load them.
        teachers = dict(config.teachers or {task: f"world:{task}" for task in shipped_teachers()})
    missing = [task for task in TASKS if task not in teachers]
    if missing:
        raise ValueError(f"No teacher for task(s) {missing}; teachers given: {sorted(teachers)}.")

    began, began_cpu = time.perf_counter(), time.process_time()
    student_dir = output_dir / "student"
    trainer = distil(teachers, config, student_dir)
    timings["stage2_opd_s"] = time.perf_counter() - began
    timings["stage2_opd_cpu_s"] = time.process_time() - began_cpu

    adapters = {f"teacher: {task}": path for task, path in teachers.items()}
    if config.retrain_teachers or config.multitask_baseline:
        began = time.perf_counter()
        adapters["multi-task RL (DiffusionNFT)"] = train_multitask_baseline(config, output_dir / "multitask_rl")
        timings["multitask_rl_s"] = time.perf_counter() - began
    adapters["student: DiffusionOPD"] = str(student_dir)

    began, began_cpu = time.perf_counter(), time.process_time()
    result = evaluate(adapters, config, output_dir)
    write_comparison(result, config, output_dir / "comparison.png")
    timings["evaluation_s"] = time.perf_counter() - began
    timings["evaluation_cpu_s"] = time.process_time() - began_cpu
    write_student_card(trainer, result, "student: DiffusionOPD")
    timings["total_s"] = time.perf_counter() - start
    timings["total_cpu_s"] = time.process_time() - start_cpu
    timings["threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):  # other processes' share of the CPU while the demo ran (1-minute average)
        timings["load_average_1min_at_end"] = os.getloadavg()[0]
    summary = {
        "config": {k: v for k, v in asdict(config).items() if k != "teachers"},
        "teachers": teachers,
        "timings": timings,
        "opd_log": [entry for entry in trainer.state.log_history if "loss" in entry],
        "table": result.to_dict(),
    }
    (output_dir / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return result
