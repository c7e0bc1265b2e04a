"""The paper's ablations on the world's real teachers: sampler (ODE vs SDE at a = 0.3 / 0.7) and
loss (closed-form KL vs the PPO-style surrogate).

Each method distils the three shipped world teachers into a student from the same initialisation, prompts and
optimiser (`world.demo`'s quick settings). Every `every` rounds the student is measured on held-out scenes: its
three rewards (sampled with the ODE, as the table samples every model) and its KL to each task's teacher on
ODE rollouts (an evaluator trainer with `noise_level=0` that receives the student's weights), so every method is
scored on the same scale whatever its own sampler. The table reports, as mean ± std over seeds, the final rewards,
the rounds each method needs to reach 90 % of its own final reward gain and of its own KL reduction, and the rounds
it needs to reach a common target: 90 % of the largest mean final gain of any method (the same bar for every method,
so a method that gains less is not rewarded for reaching its own smaller gain sooner).

A method may carry its own learning rate (the PPO-style surrogate diverges at the closed form's). Each (method, seed)
run is cached under `--cache_dir` with the settings it depends on, so more seeds or methods add runs without
redoing the finished ones.

    python -m benchmarks.world_ablation [--quick] [--seeds 0 1] [--methods ...] [--rounds 30] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, markdown_table, setup, write_results


TASKS = ("composition", "letters", "aesthetic")
METHODS = {
    "ODE (closed form)": {"noise_level": 0.0, "loss_type": "kl"},
    "SDE a=0.3 (closed form)": {"noise_level": 0.3, "loss_type": "kl"},
    "SDE a=0.7 (closed form)": {"noise_level": 0.7, "loss_type": "kl"},
    "PPO-style a=0.7": {"noise_level": 0.7, "loss_type": "ppo"},
    "PPO-style a=0.7, lr 2e-4": {"noise_level": 0.7, "loss_type": "ppo", "learning_rate": 2e-4},
}
DEFAULT_METHODS = list(METHODS)
# The round and query options (`benchmarks.world_scale_modes`), each against "ODE (closed form)": every round's rows
# in one mixed-task batch, single-query supervision (any trained state), the base as an anchor, a guidance-free
# student under CFG-2 teachers (its KL column is to the CFG-1 teachers the evaluator uses, so only its rewards compare).
METHODS.update(
    {
        "mixed-task rounds (3 tasks x 2 rows)": {"tasks_per_round": 3, "rows_per_round": 6},
        "mixed-task rounds (1 task x 2 rows)": {"tasks_per_round": 1, "rows_per_round": 2},
        "single query": {"query_mode": "single", "query_sigma_range": "0,1"},
        "anchor: base, weight 0.1": {"anchor_teacher": "base", "anchor_weight": 0.1},
        "CFG-absorbed (teachers at CFG 2)": {"guidance_free_student": True, "teacher_guidance_scale": 2.0},
        # Many teachers (`teacher_slices`): each world teacher loaded as 10 adapters, each owning a tenth of its task's
        # training prompts, 30 tasks drawn 3 per round at the same 6 rows: against the 3-task mixed row above.
        "mixed-task rounds, 30 teachers (3 of 30 x 2 rows)": {
            "tasks_per_round": 3,
            "rows_per_round": 6,
            "teacher_slices": 10,
        },
    }
)


@dataclass
class AblationSettings:
    rounds: int = 30
    every: int = 5
    prompts_per_task: int = 2
    learning_rate: float = 2e-3
    eval_images: int = 32
    kl_prompts: int = 4
    seed: int = 0
    num_inference_steps: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> AblationSettings:
        return cls(rounds=2, every=1, prompts_per_task=1, eval_images=2, kl_prompts=1, num_inference_steps=3)


def run_method(name: str, settings: AblationSettings, folder: str, seed: int | None = None) -> dict:
    """Train one method (`seed`: else `settings.seed`) with checkpoints; returns `{"method", "seed", "records":
    [{round, seconds, rewards, average, kl}], "train_cpu_s"}`."""
    setup(1)
    seed = settings.seed if seed is None else seed
    method = dict(METHODS[name])
    learning_rate = method.pop("learning_rate", settings.learning_rate)
    slices = method.pop("teacher_slices", None)
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from transformers import TrainerCallback

    from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
    from trl_diffusion_opd.families.sd3 import SD3Family
    from trl_diffusion_opd.rewards import get_reward, nanmean
    from trl_diffusion_opd.world.demo import DemoConfig, student_trainer, teacher_step_fractions
    from trl_diffusion_opd.world.pipeline import MAX_SEQUENCE_LENGTH, load_world_pipeline
    from trl_diffusion_opd.world.scenes import IMAGE_SIZE, task_prompts
    from trl_diffusion_opd.world.teachers import EVAL_SEED, TASK_REWARDS

    held_out = {task: task_prompts(task, settings.eval_images, seed=EVAL_SEED) for task in TASKS}
    kl_rows = {task: rows[: settings.kl_prompts] for task, rows in held_out.items()}
    teachers = {task: f"world:{task}" for task in TASKS}
    templates = settings.extra.get("task_prompt_templates") or {}
    # The evaluator: the same base and teachers, ODE rollouts, receives the student's weights at every checkpoint.
    evaluator = DiffusionOPDTrainer(
        load_world_pipeline(),
        teachers,
        args=DiffusionOPDConfig(
            output_dir=str(Path(folder) / "evaluator"),
            resolution=IMAGE_SIZE,
            num_inference_steps=settings.num_inference_steps,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            guidance_scale=1.0,
            teacher_guidance_scale=1.0,
            noise_level=0.0,
            per_device_train_batch_size=settings.kl_prompts,
            ema=False,
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            task_prompt_templates=templates or None,
            # the KL on the steps each task is trained on (the demo's default: its teacher's trained steps)
            task_timestep_fraction=teacher_step_fractions(teachers, settings.extra.get("task_timestep_fraction")),
        ),
        train_dataset=kl_rows,
        peft_config=LoraConfig(
            r=DemoConfig.lora_rank,
            lora_alpha=DemoConfig.lora_rank,
            target_modules=list(SD3Family.default_lora_targets),
        ),
    )
    eval_model = evaluator.accelerator.unwrap_model(evaluator.model)
    rewards = {task: get_reward(TASK_REWARDS[task]) for task in TASKS}

    def measure(trainer, step: int, seconds: float) -> dict:
        set_peft_model_state_dict(eval_model, trainer.student_state_dict(), adapter_name="student")
        scores = {}
        for task, rows in held_out.items():
            texts = [row["prompt"] for row in rows]
            images = evaluator.generate(
                evaluator.student_prompts(task, texts),
                seed=EVAL_SEED,
                num_inference_steps=settings.num_inference_steps,
            )
            scores[task] = nanmean(rewards[task](images, texts, rows))
        kl = evaluator.compute_teacher_kl(kl_rows, seed=1234)
        return {
            "round": step,
            "seconds": seconds,
            "rewards": scores,
            "average": statistics.fmean(scores.values()),
            "kl": statistics.fmean(kl.values()),
            "kl_per_task": kl,
        }

    class Checkpoints(TrainerCallback):
        def __init__(self):
            self.seconds, self.records, self.trainer = 0.0, [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.records.append(measure(self.trainer, 0, 0.0))

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.process_time() - self.start
            if state.global_step % settings.every == 0 or state.global_step == settings.rounds:
                self.records.append(measure(self.trainer, state.global_step, self.seconds))

    config = DemoConfig(
        output_dir=folder,
        rounds=settings.rounds,
        prompts_per_task=settings.prompts_per_task,
        learning_rate=learning_rate,
        num_inference_steps=settings.num_inference_steps,
        seed=seed,
        progress=False,
        extra={**settings.extra, **method},
    )
    train_teachers, train_prompts = teachers, None
    if slices:
        train_teachers, train_prompts, fractions = sliced_teachers(teachers, slices)
        config.task_timestep_fraction = fractions
    callback = Checkpoints()
    callback.trainer = student_trainer(train_teachers, config, Path(folder) / "student", rows=train_prompts)
    callback.trainer.add_callback(callback)
    callback.trainer.train()
    return {"method": name, "seed": seed, "records": callback.records, "train_cpu_s": callback.seconds}


def sliced_teachers(teachers: dict[str, str], slices: int) -> tuple[dict[str, str], dict[str, list[dict]], dict]:
    """Each teacher as `slices` narrower tasks (`<task>_<k>`, the same LoRA as its own adapter), task `<task>_<k>`
    owning every `slices`-th of the task's 64 training prompts from the k-th; with each task's trained step fraction."""
    from trl_diffusion_opd.world.demo import train_rows
    from trl_diffusion_opd.world.teachers import RECIPES

    names, rows, fractions = {}, {}, {}
    for task, spec in teachers.items():
        prompts = train_rows(task, 64)
        for k in range(slices):
            names[f"{task}_{k}"] = spec
            rows[f"{task}_{k}"] = prompts[k::slices]
            fractions[f"{task}_{k}"] = RECIPES[task].timestep_fraction
    return names, rows, fractions


def rounds_to(records: list[dict], key: str, fraction: float = 0.9, rising: bool = True) -> float | None:
    """First round (linearly interpolated) at which `key` has made `fraction` of its change from round 0 to the last
    checkpoint (a rise for rewards, a fall for the KL)."""
    first, last = records[0][key], records[-1][key]
    target = first + fraction * (last - first)
    for a, b in zip(records, records[1:]):
        if (rising and a[key] < target <= b[key]) or (not rising and a[key] > target >= b[key]):
            return a["round"] + (target - a[key]) / (b[key] - a[key]) * (b["round"] - a["round"])
    return None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def load_cached(name: str, seed: int, settings: AblationSettings, cache_dir: str) -> dict | None:
    """The run in `<cache_dir>/<method>-seed<seed>/result.json` if it has the same settings, else `None`."""
    cached = Path(cache_dir) / f"{_slug(name)}-seed{seed}" / "result.json"
    wanted = json.loads(json.dumps({**asdict(settings), "seed": seed, "method": METHODS[name]}))
    if cached.is_file():
        result = json.loads(cached.read_text())
        if result.get("settings") == wanted:
            return result
    return None


def run_cached(name: str, seed: int, settings: AblationSettings, cache_dir: str) -> dict:
    """`run_method` unless `<cache_dir>/<method>-seed<seed>/result.json` holds a run with the same settings."""
    result = load_cached(name, seed, settings, cache_dir)
    if result is not None:
        return result
    folder = Path(cache_dir) / f"{_slug(name)}-seed{seed}"
    cached = folder / "result.json"
    wanted = json.loads(json.dumps({**asdict(settings), "seed": seed, "method": METHODS[name]}))
    result = {**run_method(name, settings, str(folder), seed), "settings": wanted}
    if result["records"][-1]["round"] != settings.rounds:  # stopped by a signal: a clean stop, not a finished run
        raise RuntimeError(f"{name} (seed {seed}) stopped after round {result['records'][-1]['round']}: not cached")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(cached)  # a stop mid-write leaves no half result
    return result


def rounds_to_value(records: list[dict], key: str, target: float) -> float | None:
    """First round (linearly interpolated) at which the rising `key` reaches `target`; `None` if it never does."""
    if records[0][key] >= target:
        return float(records[0]["round"])
    for a, b in zip(records, records[1:]):
        if a[key] < target <= b[key]:
            return a["round"] + (target - a[key]) / (b[key] - a[key]) * (b["round"] - a["round"])
    return None


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and std of the values that are not `None`, and how many were `None`."""
    known = [v for v in values if v is not None]
    if not known:
        return None, None, len(values)
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None, len(values) - len(known)


def summarize(results: list[dict], fraction: float = 0.9) -> list[dict]:
    """One row per method: mean / std over seeds of the final rewards, the ODE KL, the rounds to `fraction` of the
    method's own reward gain and KL drop, and the rounds to the common target (`fraction` of the largest mean final
    gain of any method, from each seed's shared round-0 average)."""
    by_method: dict[str, list[dict]] = {}
    for result in results:
        by_method.setdefault(result["method"], []).append(result)
    gain = {
        name: statistics.fmean(r["records"][-1]["average"] - r["records"][0]["average"] for r in runs)
        for name, runs in by_method.items()
    }
    best_gain = max(gain.values())
    rows = []
    for name in [m for m in METHODS if m in by_method]:
        runs = sorted(by_method[name], key=lambda r: r["seed"])
        row: dict[str, Any] = {"method": name, "seeds": [r["seed"] for r in runs], "gain": gain[name]}
        for task in TASKS:
            row[task] = _mean_std([r["records"][-1]["rewards"][task] for r in runs])
        row["average"] = _mean_std([r["records"][-1]["average"] for r in runs])
        row["kl"] = _mean_std([r["records"][-1]["kl"] for r in runs])
        row["own_reward"] = _mean_std([rounds_to(r["records"], "average", fraction) for r in runs])
        row["own_kl"] = _mean_std([rounds_to(r["records"], "kl", fraction, rising=False) for r in runs])
        row["common"] = _mean_std(
            [rounds_to_value(r["records"], "average", r["records"][0]["average"] + fraction * best_gain) for r in runs]
        )
        row["train_cpu_s"] = statistics.fmean(r["train_cpu_s"] for r in runs)
        rows.append(row)
    return rows


def _cell(stat: tuple[float | None, float | None, int], fmt: str = ".3f") -> str:
    mean, std, missing = stat
    if mean is None:
        return "not reached"
    text = f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if std is not None else "")
    return text + (f" ({missing} not reached)" if missing else "")


def to_markdown(rows: list[dict]) -> str:
    headers = [
        "method",
        "seeds",
        *TASKS,
        "average",
        "ODE KL",
        "rounds to 90 % of own reward gain",
        "rounds to 90 % of own KL drop",
        "rounds to the common target",
        "train CPU s",
    ]
    lines = [
        [
            row["method"],
            len(row["seeds"]),
            *[_cell(row[task]) for task in TASKS],
            _cell(row["average"]),
            _cell(row["kl"], ".2e"),
            _cell(row["own_reward"], ".1f"),
            _cell(row["own_kl"], ".1f"),
            _cell(row["common"], ".1f"),
            f"{row['train_cpu_s']:.0f}",
        ]
        for row in rows
    ]
    return markdown_table(headers, lines)


def run(
    settings: AblationSettings | None = None,
    workers: int = 2,
    write: bool = True,
    folder: str | None = None,
    methods: list[str] | None = None,
    seeds: tuple[int, ...] | None = None,
    cached_only: bool = False,
) -> dict:
    """Run (or reuse from `folder`) every (method, seed) and summarise (`cached_only`: only the runs already in
    `folder`). Returns `{"settings", "results", "rows", "markdown"}`; with `write`, also the results file, the
    RESULTS.md section and the curves PNG."""
    import tempfile

    settings = settings or AblationSettings()
    folder = folder or tempfile.mkdtemp(prefix="world_ablation_")
    methods = methods or DEFAULT_METHODS
    seeds = seeds or (settings.seed,)
    todo = [(name, seed) for seed in seeds for name in methods]
    if cached_only:
        results = [r for r in (load_cached(name, seed, settings, folder) for name, seed in todo) if r is not None]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_cached, name, seed, settings, folder) for name, seed in todo]
            results = [future.result() for future in futures]
    rows = summarize(results)
    markdown = to_markdown(rows)
    out = {"settings": asdict(settings), "results": results, "rows": rows, "markdown": markdown}
    if write:
        png = plot(results, RESULTS_DIR / "world_ablation.png")
        write_results(
            "world_ablation",
            "Sampler and loss ablations on the world's teachers (benchmarks.world_ablation)",
            {**asdict(settings), "seeds": list(seeds), "methods": methods},
            {"rows": rows, "results": results},
            f"{markdown}\n\n![ablation curves]({png.relative_to(RESULTS_DIR.parent).as_posix()})\n",
        )
    return out


def plot(results: list[dict], path: Path) -> Path:
    """Reward and KL curves, one line per method (the mean over its seeds at each checkpoint)."""
    from .plot import Panel, Series, save_line_plot

    reward = Panel("Held-out reward (average of the three tasks)", "round", "reward")
    kl = Panel("KL to the teachers (ODE rollouts, held-out prompts)", "round", "KL", log_y=True)
    by_method: dict[str, list[dict]] = {}
    for result in results:
        by_method.setdefault(result["method"], []).append(result)
    for name, runs in by_method.items():
        rounds = [r["round"] for r in runs[0]["records"]]
        # short enough for the legend inside the panel
        label = name.replace(" (closed form)", "") + (f", mean of {len(runs)} seeds" if len(runs) > 1 else "")
        for panel, key in ((reward, "average"), (kl, "kl")):
            values = [statistics.fmean(run["records"][i][key] for run in runs) for i in range(len(rounds))]
            panel.series.append(Series(label, rounds, values))
    save_line_plot([reward, kl], path, title="DiffusionOPD on the world: sampler and loss ablations")
    return Path(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--every", type=int, default=None)
    parser.add_argument("--eval_images", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Seeds of every method (default: 0).")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="Only these methods.")
    parser.add_argument("--cache_dir", default=None, help="Finished runs are kept here (default: results folder).")
    parser.add_argument("--extra", default=None, help="JSON dict of DiffusionOPDConfig fields for every method.")
    args = parser.parse_args(argv)
    settings = AblationSettings.quick() if args.quick else AblationSettings()
    for name in ("rounds", "every", "eval_images"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.extra:
        settings.extra = json.loads(args.extra)
    folder = args.cache_dir or (None if args.quick else str(RESULTS_DIR / "world_ablation_runs"))
    seeds = tuple(args.seeds) if args.seeds else None
    out = run(settings, workers=args.workers, write=not args.quick, folder=folder, methods=args.methods, seeds=seeds)
    print(out["markdown"])
    return out


if __name__ == "__main__":
    main()
