"""The paper's comparison on the tiny world, with seeds and costs.

Rows (each trained on the shipped world base, evaluated on the same held-out scenes with the same initial noise):

- `base`: the shipped base, no training.
- `teacher: <task>`: the shipped Stage-1 teachers (`world.teachers`); their cost is the training time recorded when
  they were trained (`training.json`, one CPU thread).
- `multi-task GRPO-Guard` / `multi-task DiffusionNFT`: one LoRA trained by RL on the prompts of all three tasks, each
  image rewarded by its own task's reward (`world_task`), with the letters teacher's GRPO-Guard recipe and the
  aesthetic teacher's DiffusionNFT recipe respectively (the paper's multi-task rows).
- `cascade RL`: the teachers' recipes run one task after another on one adapter (composition, then letters, then
  aesthetic; the first stage is the shipped composition teacher, counted at its recorded cost).
- `off-policy distillation`: a fresh student LoRA fine-tuned by flow matching on the teachers' own samples (each
  task's training prompts sampled by its teacher).
- `DiffusionOPD`: the student of `world.demo` (the full-size settings), distilled from the three shipped teachers,
  each task supervised on the steps its teacher was trained on (`task_timestep_fraction`).
- `merge: ...`: the three shipped teachers merged with PEFT's `add_weighted_adapter` (`trl_diffusion_opd.merging`,
  the `merge` command), no training: the weighted sum of the deltas (`cat`), its rank-16 SVD, PEFT's `linear`, TIES
  and DARE, on the factors and on the deltas (`MERGES`).
- `DiffusionOPD from a merge`: the DiffusionOPD student started from the rank-16 SVD merge (`student_adapter`)
  instead of a fresh LoRA (Flow-OPD's cold start); `... 20 rounds` rows stop both students at a third of the rounds.

Columns: each task's reward on its held-out scenes, the average, and the CPU seconds of the row's training (one
torch thread per job: far less inflated than the wall-clock by other jobs on the machine, though not immune, ~20 %;
the wall-clock is in the JSON; `+ teachers` adds the Stage-1 cost for the rows that need the teachers). Rows with several seeds report
mean ± std over seeds; `sem` is the standard error of one seed's mean over the held-out scenes.

Every row is one job run in a worker process with one torch thread; finished jobs are cached under `--cache_dir`
(`<job>/result.json`), so an interrupted run resumes where it stopped.

```bash
python -m benchmarks.paper_table                 # the full table: 132 CPU-minutes (105 min on 2 shared cores)
python -m benchmarks.paper_table --quick         # every row's code path in about two minutes, nothing written
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .common import BENCH_DIR, RESULTS_DIR, machine_info, markdown_table, setup, write_results


TASKS = ("composition", "letters", "aesthetic")


def teacher_step_fractions() -> dict[str, float]:
    """`{task: timestep_fraction}` the shipped world teachers were trained with (`world.teachers.RECIPES`)."""
    from trl_diffusion_opd.world.teachers import RECIPES

    return {task: RECIPES[task].timestep_fraction for task in TASKS}


# The merge rows, no training: kind -> (PEFT combination type, weight of each teacher, density, svd_rank, label).
# TIES divides by the number of teachers that agree on an entry (a mean), so its natural weight is 1; the others sum.
MERGES = {
    "merge_cat": ("cat", 1 / 3, None, None, "merge: weighted sum of deltas (cat, w 1/3)"),
    "merge_cat_half": ("cat", 1 / 2, None, None, "merge: weighted sum of deltas (cat, w 1/2)"),
    "merge_svd": ("svd", 1 / 3, None, 16, "merge: sum of deltas, SVD to rank 16 (w 1/3)"),
    "merge_linear": ("linear", 1 / 3, None, None, "merge: PEFT linear, factor sums (w 1/3)"),
    "merge_ties": ("ties_svd", 1.0, 0.5, 24, "merge: TIES on deltas (density 0.5, w 1, r24)"),
    "merge_ties_factors": ("ties", 1.0, 0.5, None, "merge: TIES on factors (density 0.5, w 1)"),
    "merge_dare": ("dare_linear_svd", 1 / 3, 0.5, 24, "merge: DARE on deltas (density 0.5, w 1/3, r24)"),
    "merge_dare_factors": ("dare_linear", 1 / 3, 0.5, None, "merge: DARE on factors (density 0.5, w 1/3)"),
}


@dataclass
class TableSettings:
    """Sizes of the table's runs (`quick()` shrinks every one to a smoke test of its code path).

    Attributes:
        seeds: Seeds of the rows trained with several seeds (the student and the multi-task baselines).
        single_seeds: Seeds of the cascade and the off-policy baseline (the cascade's stages cost two teachers).
        eval_images: Held-out scenes per task. Sampling costs ~0.32 CPU-s per image here, and the per-image std
            of the rewards is ~0.19 / 0.15 / 0.10 (composition / letters / aesthetic), so the default's standard
            error of a mean is ~0.02; below 0.005 needs ~1500 scenes per task (~25 CPU-min per model).
        opd_rounds, opd_prompts, opd_learning_rate, opd_rank: The DiffusionOPD student (`world.demo`'s full size).
        opd_extra: More `DiffusionOPDConfig` fields of the student. The default supervises each task on the steps
            its teacher was trained on (`task_timestep_fraction` from the teachers' recipes; see docs/world.md,
            "Several teachers, one student").
        multitask_steps: Optimizer steps of each multi-task RL baseline (40 steps of 24 images: the rollouts of one
            teacher's 60 steps of 16).
        cascade_steps: Steps of each cascade stage after the first (`None`: the teacher recipes').
        offpolicy_samples: Teacher samples per task for the off-policy baseline.
        offpolicy_steps, offpolicy_batch, offpolicy_learning_rate: Its flow-matching fine-tuning.
        num_inference_steps: Sampler steps of training rollouts and evaluation.
        merges: The merge rows (`MERGES` kinds), scored with no training; the `opd_from_merge` students (the first
            two `seeds`) start from the `START_MERGE` merge.
        short_rounds: Rounds of the `opd_short` and `opd_from_merge_short` rows (`single_seeds`), which show which
            student gets there first; `None` leaves them out.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    single_seeds: tuple[int, ...] = (0,)
    eval_images: int = 64
    opd_rounds: int = 60
    opd_prompts: int = 4
    opd_learning_rate: float = 1e-3
    opd_rank: int = 16
    opd_extra: dict[str, Any] = field(default_factory=lambda: {"task_timestep_fraction": teacher_step_fractions()})
    multitask_steps: int = 40
    cascade_steps: int | None = None
    offpolicy_samples: int = 128
    offpolicy_steps: int = 120
    offpolicy_batch: int = 32
    offpolicy_learning_rate: float = 1e-3
    num_inference_steps: int = 10
    merges: tuple[str, ...] = tuple(MERGES)
    short_rounds: int | None = 20

    @classmethod
    def quick(cls) -> TableSettings:
        return cls(
            seeds=(0,),
            eval_images=8,
            opd_rounds=2,
            opd_prompts=2,
            multitask_steps=1,
            cascade_steps=1,
            offpolicy_samples=4,
            offpolicy_steps=2,
            offpolicy_batch=4,
            num_inference_steps=4,
            merges=("merge_cat", "merge_dare"),
            short_rounds=None,
        )


@dataclass(frozen=True)
class Job:
    """One trained (or shipped) model of the table: `kind` with `seed` (`task` for a teacher)."""

    kind: str
    seed: int = 0
    task: str | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.task}" if self.task else f"{self.kind}-seed{self.seed}"


ROW_LABELS = {
    "base": "base",
    "teacher": "teacher: {task}",
    "multitask_grpo_guard": "multi-task GRPO-Guard",
    "multitask_nft": "multi-task DiffusionNFT",
    "cascade": "cascade RL (composition → letters → aesthetic)",
    "offpolicy": "off-policy distillation (flow matching on teacher samples)",
    "opd": "DiffusionOPD (student)",
    "opd_short": "DiffusionOPD, 20 rounds",
    "opd_from_merge": "DiffusionOPD from a merge (svd r16, w 1/3)",
    "opd_from_merge_short": "DiffusionOPD from a merge, 20 rounds",
}
ROW_LABELS.update({kind: spec[-1] for kind, spec in MERGES.items()})
# The start of the `opd_from_merge` students: the rank-16 SVD of the weighted sum (the fresh student's rank).
START_MERGE = "merge_svd"
# The chart's legend: at most 48 characters, and no arrows (the bundled font has no glyph for them)
CHART_LABELS = {
    "cascade": "cascade RL (composition, letters, aesthetic)",
    "offpolicy": "off-policy distillation (flow matching)",
}
NEEDS_TEACHERS = ("offpolicy", "opd", "opd_short", "opd_from_merge", "opd_from_merge_short", *MERGES)


def jobs(settings: TableSettings) -> list[Job]:
    """Every job of the table, the most expensive first (so that two workers finish together)."""
    trained = [Job(kind, seed) for kind in ("multitask_nft", "multitask_grpo_guard") for seed in settings.seeds]
    trained += [Job("cascade", seed) for seed in settings.single_seeds]
    trained += [Job("opd", seed) for seed in settings.seeds]
    trained += [Job("opd_from_merge", seed) for seed in settings.seeds[:2]]
    if settings.short_rounds:
        short = ("opd_short", "opd_from_merge_short")
        trained += [Job(kind, seed) for kind in short for seed in settings.single_seeds]
    trained += [Job("offpolicy", seed) for seed in settings.single_seeds]
    merges = [Job(kind) for kind in settings.merges]
    return trained + [Job("base")] + [Job("teacher", task=task) for task in TASKS] + merges


# ---------------------------------------------------------------------------------------------- training
def _timed(train, *args, **kwargs) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = train(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def recorded_teacher_seconds(task: str) -> float:
    """Training seconds of the shipped `task` teacher, as recorded when it was trained (one CPU thread)."""
    from trl_diffusion_opd.world.teachers import teacher_folder

    return float(json.loads((teacher_folder(task) / "training.json").read_text())["train_seconds"])


def train_opd(job: Job, settings: TableSettings, folder: Path, rounds: int | None = None) -> Path:
    from trl_diffusion_opd.world.demo import DemoConfig, distil

    config = DemoConfig(
        output_dir=str(folder),
        rounds=rounds or _rounds(job, settings),
        prompts_per_task=settings.opd_prompts,
        learning_rate=settings.opd_learning_rate,
        lora_rank=settings.opd_rank,
        num_inference_steps=settings.num_inference_steps,
        seed=job.seed,
        progress=False,
        extra=dict(settings.opd_extra),
    )
    distil({task: f"world:{task}" for task in TASKS}, config, folder / "adapter")
    return folder / "adapter"


def merge_teachers(kind: str, folder: Path, seed: int = 0) -> Path:
    """The shipped teachers merged as `MERGES[kind]` says (`trl_diffusion_opd.merging`), written to `folder`."""
    from trl_diffusion_opd.merging import merge_adapters
    from trl_diffusion_opd.world.pipeline import load_world_pipeline

    combination, weight, density, svd_rank, _ = MERGES[kind]
    pipe = load_world_pipeline()
    merged = merge_adapters(
        pipe,
        {task: f"world:{task}" for task in TASKS},
        weights=weight,
        combination_type=combination,
        density=density,
        svd_rank=svd_rank,
        seed=seed,
    )
    return merged.save(folder, pipe, base_name="world:base")


def train_merge(job: Job, settings: TableSettings, folder: Path) -> Path:
    return merge_teachers(job.kind, folder / "adapter", seed=job.seed)


def train_opd_from_merge(job: Job, settings: TableSettings, folder: Path) -> Path:
    """The DiffusionOPD student (`train_opd`'s settings) started from the `START_MERGE` merge of the teachers."""
    start = merge_teachers(START_MERGE, folder / "merged", seed=job.seed)
    extra = {**settings.opd_extra, "student_adapter": str(start)}
    return train_opd(
        replace(job, kind="opd"), replace(settings, opd_extra=extra), folder, rounds=_rounds(job, settings)
    )


def _rounds(job: Job, settings: TableSettings) -> int:
    return settings.short_rounds if job.kind.endswith("_short") else settings.opd_rounds


def train_multitask(job: Job, settings: TableSettings, folder: Path) -> Path:
    from trl_diffusion_opd.world.teachers import MULTITASK, RECIPES, train_world_teacher

    overrides: dict[str, Any] = {"max_steps": settings.multitask_steps}
    if settings.num_inference_steps != RECIPES[MULTITASK].num_inference_steps:
        overrides["num_inference_steps"] = settings.num_inference_steps
    if job.kind == "multitask_grpo_guard":  # the letters teacher's GRPO-Guard recipe on every task's prompts
        letters = RECIPES["letters"]
        overrides.update(trainer="grpo_guard", learning_rate=letters.learning_rate, extra=dict(letters.extra))
    return train_world_teacher(MULTITASK, folder / "adapter", seed=job.seed, progress=False, **overrides)


def train_cascade(job: Job, settings: TableSettings, folder: Path) -> Path:
    """Stage 1 is the shipped composition teacher; letters and aesthetic follow with their own recipes, each stage
    continuing the previous stage's adapter (`student_adapter`)."""
    from trl_diffusion_opd.world.teachers import teacher_folder, train_world_teacher

    previous = teacher_folder("composition")
    for task in ("letters", "aesthetic"):
        overrides: dict[str, Any] = {"extra": {"student_adapter": str(previous)}}
        if settings.cascade_steps is not None:
            overrides["max_steps"] = settings.cascade_steps
        if settings.num_inference_steps != 10:
            overrides["num_inference_steps"] = settings.num_inference_steps
        previous = train_world_teacher(task, folder / f"stage-{task}", seed=job.seed, progress=False, **overrides)
    return previous


def train_offpolicy(job: Job, settings: TableSettings, folder: Path) -> Path:
    """Flow-matching fine-tuning of a fresh LoRA (the student's rank and targets) on each teacher's own ODE samples
    of its task's training prompts: x_t = (1 - t) x0 + t ε, loss ‖v(x_t, t) - (ε - x0)‖²."""
    import numpy as np
    import torch
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from trl_diffusion_opd.families.sd3 import SD3Family
    from trl_diffusion_opd.world.pipeline import encode_prompts, load_world_pipeline, sample_images
    from trl_diffusion_opd.world.pretrain import flow_matching_loss, sample_timesteps
    from trl_diffusion_opd.world.scenes import task_prompts
    from trl_diffusion_opd.world.teachers import load_teacher_pipeline, teacher_folder

    images, prompts = [], []
    for task in TASKS:
        texts = [row["prompt"] for row in task_prompts(task, settings.offpolicy_samples, seed=job.seed)]
        teacher = load_teacher_pipeline(teacher_folder(task))
        samples = sample_images(teacher, texts, settings.num_inference_steps, seed=1_000 + job.seed)
        images += [np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for image in samples]
        prompts += texts
    x0_all = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()

    torch.manual_seed(job.seed)
    pipe = load_world_pipeline()
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    lora = LoraConfig(
        r=settings.opd_rank,
        lora_alpha=settings.opd_rank,
        init_lora_weights="gaussian",
        target_modules=list(SD3Family.default_lora_targets),
    )
    transformer.add_adapter(lora)
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.offpolicy_learning_rate, weight_decay=1e-4)
    with torch.no_grad():
        cond_all = encode_prompts(pipe, prompts)
    shift = pipe.scheduler.config.shift
    generator = torch.Generator().manual_seed(job.seed)
    transformer.train()
    for _ in range(settings.offpolicy_steps):
        idx = torch.randint(0, len(prompts), (settings.offpolicy_batch,), generator=generator)
        x0 = x0_all[idx]
        t = sample_timesteps(len(idx), shift, "logit_normal", generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = flow_matching_loss(transformer, x0, {k: v[idx] for k, v in cond_all.items()}, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
    StableDiffusion3Pipeline.save_lora_weights(
        folder / "adapter", transformer_lora_layers=get_peft_model_state_dict(transformer)
    )
    return folder / "adapter"


TRAINERS = {
    "opd": train_opd,
    "opd_short": train_opd,
    "opd_from_merge": train_opd_from_merge,
    "opd_from_merge_short": train_opd_from_merge,
    **dict.fromkeys(MERGES, train_merge),
    "multitask_nft": train_multitask,
    "multitask_grpo_guard": train_multitask,
    "cascade": train_cascade,
    "offpolicy": train_offpolicy,
}


# ---------------------------------------------------------------------------------------------- one job
JOB_SETTINGS = {
    "opd": ("opd_rounds", "opd_prompts", "opd_learning_rate", "opd_rank", "opd_extra"),
    "opd_short": ("short_rounds", "opd_prompts", "opd_learning_rate", "opd_rank", "opd_extra"),
    "opd_from_merge": ("opd_rounds", "opd_prompts", "opd_learning_rate", "opd_extra"),
    "opd_from_merge_short": ("short_rounds", "opd_prompts", "opd_learning_rate", "opd_extra"),
    "multitask_nft": ("multitask_steps",),
    "multitask_grpo_guard": ("multitask_steps",),
    "cascade": ("cascade_steps",),
    "offpolicy": (
        "offpolicy_samples",
        "offpolicy_steps",
        "offpolicy_batch",
        "offpolicy_learning_rate",
        "opd_rank",
    ),
}


def job_settings(job: Job, settings: TableSettings) -> dict:
    """The settings a job's result depends on: a cached result is reused only when they are unchanged."""
    names = ("eval_images", "num_inference_steps", *JOB_SETTINGS.get(job.kind, ()))
    wanted = {name: getattr(settings, name) for name in names}
    merge = job.kind if job.kind in MERGES else START_MERGE if job.kind.startswith("opd_from_merge") else None
    if merge is not None:
        wanted["merge"] = MERGES[merge][:4]
    return json.loads(json.dumps(wanted))


def run_job(job: Job, settings: TableSettings, cache_dir: str) -> dict:
    """Train `job` (unless it is the base or a shipped teacher), score it on every task's held-out scenes and cache
    the result in `<cache_dir>/<job.key>/result.json`. Returns the result."""
    setup(1)
    from trl_diffusion_opd.world.teachers import load_teacher_pipeline, score_pipeline, teacher_folder

    folder = Path(cache_dir) / job.key
    cached = folder / "result.json"
    wanted = job_settings(job, settings)
    if cached.is_file():
        result = json.loads(cached.read_text())
        if result.get("settings") == wanted:
            return result
    folder.mkdir(parents=True, exist_ok=True)
    cost: dict[str, float] = {}
    if job.kind == "base":
        adapter = None
    elif job.kind == "teacher":
        adapter = teacher_folder(job.task)
        cost = {"train_s": recorded_teacher_seconds(job.task), "recorded": True}
    else:
        adapter, wall, cpu = _timed(TRAINERS[job.kind], job, settings, folder)
        cost = {"train_s": wall, "train_cpu_s": cpu}
        if job.kind == "cascade":  # its first stage is the shipped composition teacher
            cost["train_s"] += recorded_teacher_seconds("composition")
            cost["train_cpu_s"] += recorded_teacher_seconds("composition")
    began = time.perf_counter()
    scores = score_pipeline(
        load_teacher_pipeline(adapter),
        TASKS,
        num_images=settings.eval_images,
        num_inference_steps=settings.num_inference_steps,
        per_image=True,
    )
    result = {
        "job": asdict(job),
        "key": job.key,
        "settings": wanted,
        "scores": {task: scores[task] for task in TASKS},
        "per_image": {task: scores[f"{task}/values"] for task in TASKS},
        "cost": cost,
        "eval_s": time.perf_counter() - began,
    }
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, cached)  # a crash mid-write leaves no half result behind
    return result


# ---------------------------------------------------------------------------------------------- the table
def _sem(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def summarize(results: list[dict]) -> list[dict]:
    """One entry per row: mean and std over seeds of every task's score, the average and the costs."""
    teacher_s = sum(recorded_teacher_seconds(task) for task in TASKS)
    groups: dict[str, list[dict]] = {}
    for result in results:
        job = result["job"]
        label = ROW_LABELS[job["kind"]].format(task=job["task"])
        groups.setdefault(label, []).append(result)
    rows = []
    for label, members in groups.items():
        kind = members[0]["job"]["kind"]
        row: dict[str, Any] = {"row": label, "kind": kind, "seeds": [m["job"]["seed"] for m in members]}
        for task in [*TASKS, "average"]:
            values = [
                statistics.fmean(m["scores"].values()) if task == "average" else m["scores"][task] for m in members
            ]
            row[task] = statistics.fmean(values)
            row[f"{task}_std"] = statistics.stdev(values) if len(values) > 1 else None
        row["sem"] = max(_sem(m["per_image"][task]) for m in members for task in TASKS)
        # CPU seconds of the job's one-thread process: the wall-clock counts the other jobs sharing the machine (the
        # teachers' recorded times are one-thread runs on a quiet machine, where wall and CPU time agree)
        train = [m["cost"].get("train_cpu_s", m["cost"].get("train_s")) for m in members if m["cost"]]
        wall = [m["cost"]["train_s"] for m in members if m["cost"]]
        row["train_s"] = statistics.fmean(train) if train else 0.0
        row["train_wall_s"] = statistics.fmean(wall) if wall else 0.0
        row["with_teachers_s"] = row["train_s"] + teacher_s if kind in NEEDS_TEACHERS else None
        rows.append(row)
    order = list(ROW_LABELS)
    rows.sort(key=lambda r: (order.index(r["kind"]), r["row"]))
    return rows


def _cell(row: dict, key: str, best: float | None) -> str:
    text = f"{row[key]:.3f}"
    if row.get(f"{key}_std") is not None:
        text += f" ± {row[f'{key}_std']:.3f}"
    return f"**{text}**" if best is not None and math.isclose(row[key], best) else text


def to_markdown(rows: list[dict]) -> str:
    headers = ["model", *TASKS, "Average", "seeds", "training (CPU s)", "+ teachers (CPU s)"]
    best = {key: max(r[key] for r in rows) for key in [*TASKS, "average"]}
    lines = []
    for row in rows:
        lines.append(
            [
                row["row"],
                *[_cell(row, key, best[key]) for key in [*TASKS, "average"]],
                len(row["seeds"]),
                f"{row['train_s']:.0f}" if row["train_s"] else "0",
                f"{row['with_teachers_s']:.0f}" if row["with_teachers_s"] else "",
            ]
        )
    return markdown_table(headers, lines)


def bar_chart(rows: list[dict], path: Path) -> Path:
    """A grouped bar chart (one group per column, one bar per row, ± std whiskers) as a PNG."""
    from .plot import save_bar_chart

    groups = [*TASKS, "average"]
    series = [
        (
            CHART_LABELS.get(row["kind"], row["row"]),
            [row[key] for key in groups],
            [row.get(f"{key}_std") or 0.0 for key in groups],
        )
        for row in rows
    ]
    return save_bar_chart(groups, series, path, title="The paper's comparison on the tiny world (held-out scenes)")


# The chart's rows from the merge table (`results/paper_table_merges.json`): the best merge of each kind and the
# students started from a merge, next to the full table's rows.
CHART_MERGE_ROWS = ("opd_short", "opd_from_merge_short", "opd_from_merge", "merge_cat", "merge_ties", "merge_dare")


def chart_from_results(path: Path = RESULTS_DIR / "paper_table.png") -> Path:
    """Redraw the table's chart from the saved tables, no run: the rows of `results/paper_table.json` and the
    `CHART_MERGE_ROWS` of `results/paper_table_merges.json` (the merge rows are measured in their own runs)."""
    rows = json.loads((RESULTS_DIR / "paper_table.json").read_text())["rows"]
    merges_file = RESULTS_DIR / "paper_table_merges.json"
    if merges_file.is_file():
        merges = {row["kind"]: row for row in json.loads(merges_file.read_text())["rows"]}
        rows = rows + [merges[kind] for kind in CHART_MERGE_ROWS if kind in merges]
    return bar_chart(rows, path)


def run(
    settings: TableSettings | None = None,
    workers: int = 2,
    cache_dir: str | os.PathLike | None = None,
    write: bool = True,
    progress: bool = True,
    kinds: list[str] | None = None,
) -> dict:
    """Run (or resume) every job (`kinds`: only the jobs of these row kinds) and assemble the table. Returns
    `{"rows", "results", "wall_s"}`."""
    from tqdm.auto import tqdm

    settings = settings or TableSettings()
    cache_dir = Path(cache_dir or RESULTS_DIR / "paper_table_runs")
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    todo = [job for job in jobs(settings) if kinds is None or job.kind in kinds]
    began = time.perf_counter()
    results = []
    bar = tqdm(total=len(todo), desc="paper table", unit="row", disable=not progress)
    if workers <= 1:
        for job in todo:
            results.append(run_job(job, settings, str(cache_dir)))
            bar.update(1)
    else:
        # spawn: a fresh interpreter per worker (no forked torch thread pools), one torch thread each
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_job, job, settings, str(cache_dir)): job for job in todo}
            for future in as_completed(futures):
                results.append(future.result())
                bar.set_postfix_str(futures[future].key)
                bar.update(1)
    bar.close()
    wall = time.perf_counter() - began
    rows = summarize(results)
    out = {"rows": rows, "results": results, "wall_s": wall}
    if write:
        png = bar_chart(rows, RESULTS_DIR / "paper_table.png")
        markdown = (
            f"Wall-clock of this run: {wall / 60:.1f} min with {workers} workers of one thread "
            f"(cached rows are not re-run). Held-out scenes per task: {settings.eval_images}; largest standard "
            f"error of a seed's mean: {max(r['sem'] for r in rows):.4f}.\n\n"
            f"{to_markdown(rows)}\n\n![paper table]({png.relative_to(BENCH_DIR).as_posix()})\n"
        )
        write_results(
            "paper_table",
            "The paper's comparison on the tiny world (benchmarks.paper_table)",
            {"workers": workers, **asdict(settings)},
            {"rows": rows, "wall_s": wall, "machine_at_start": machine_info()},
            markdown,
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: every row's code path, nothing written.")
    parser.add_argument("--workers", type=int, default=2, help="Jobs run in parallel (one torch thread each).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Seeds of the multi-seed rows.")
    parser.add_argument("--eval_images", type=int, default=None, help="Held-out scenes per task.")
    parser.add_argument("--cache_dir", default=None, help="Finished jobs are kept here (resume after a stop).")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROW_LABELS), help="Only these row kinds.")
    parser.add_argument(
        "--chart", action="store_true", help="Only redraw the chart from the saved tables (merge rows included)."
    )
    args = parser.parse_args(argv)
    if args.chart:
        print(chart_from_results())
        return {}
    settings = TableSettings.quick() if args.quick else TableSettings()
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.eval_images:
        settings = replace(settings, eval_images=args.eval_images)
    if args.quick and args.cache_dir is None:
        import tempfile

        args.cache_dir = tempfile.mkdtemp(prefix="paper_table_quick_")
    write = not args.quick and args.rows is None  # a subset of the rows is a step towards the table, not the table
    out = run(settings, workers=args.workers, cache_dir=args.cache_dir, write=write, kinds=args.rows)
    print(to_markdown(out["rows"]))
    return out


if __name__ == "__main__":
    main()
