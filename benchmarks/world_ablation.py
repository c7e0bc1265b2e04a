"""The paper's ablations on the world's real teachers (issue 18, item 3): sampler (ODE vs SDE at a = 0.3 / 0.7) and
loss (closed-form KL vs the PPO-style surrogate).

Each method distils the three shipped world teachers into a student from the same initialisation, prompts and
optimiser (`world.demo`'s quick settings). Every `every` rounds the student is measured on held-out scenes: its
three rewards (sampled with the ODE, as the table samples every model) and its KL to each task's teacher on
ODE rollouts (an evaluator trainer with `noise_level=0` that receives the student's weights), so every method is
scored on the same scale whatever its own sampler. The table reports the final rewards and the rounds each method
needs to reach 90 % of its final reward gain and of its final KL reduction.

    python -m benchmarks.world_ablation [--quick] [--rounds 30] [--every 5] [--eval_images 32] [--workers 2]
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
}


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


def run_method(name: str, settings: AblationSettings, folder: str) -> dict:
    """Train one method with checkpoints; returns `{"records": [{round, seconds, rewards, average, kl}], ...}`."""
    setup(1)
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
        learning_rate=settings.learning_rate,
        num_inference_steps=settings.num_inference_steps,
        seed=settings.seed,
        progress=False,
        extra={**settings.extra, **METHODS[name]},
    )
    callback = Checkpoints()
    callback.trainer = student_trainer(teachers, config, Path(folder) / "student")
    callback.trainer.add_callback(callback)
    callback.trainer.train()
    return {"method": name, "records": callback.records, "train_cpu_s": callback.seconds}


def rounds_to(records: list[dict], key: str, fraction: float = 0.9, rising: bool = True) -> float | None:
    """First round (linearly interpolated) at which `key` has made `fraction` of its change from round 0 to the last
    checkpoint (a rise for rewards, a fall for the KL)."""
    first, last = records[0][key], records[-1][key]
    target = first + fraction * (last - first)
    for a, b in zip(records, records[1:]):
        if (rising and a[key] < target <= b[key]) or (not rising and a[key] > target >= b[key]):
            return a["round"] + (target - a[key]) / (b[key] - a[key]) * (b["round"] - a["round"])
    return None


def run(
    settings: AblationSettings | None = None, workers: int = 2, write: bool = True, folder: str | None = None
) -> dict:
    import tempfile

    settings = settings or AblationSettings()
    folder = folder or tempfile.mkdtemp(prefix="world_ablation_")
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(run_method, name, settings, str(Path(folder) / str(i))) for i, name in enumerate(METHODS)
        ]
        results = [future.result() for future in futures]
    rows = []
    for result in results:
        records = result["records"]
        final = records[-1]
        rows.append(
            [
                result["method"],
                *[f"{final['rewards'][task]:.3f}" for task in TASKS],
                f"{final['average']:.3f}",
                f"{final['kl']:.2e}",
                _fmt(rounds_to(records, "average")),
                _fmt(rounds_to(records, "kl", rising=False)),
                f"{result['train_cpu_s']:.0f}",
            ]
        )
    headers = [
        "method",
        *TASKS,
        "average",
        "ODE KL",
        "rounds to 90 % of reward gain",
        "rounds to 90 % of KL drop",
        "train CPU s",
    ]
    markdown = markdown_table(headers, rows)
    out = {"settings": asdict(settings), "results": results, "markdown": markdown}
    if write:
        png = plot(results, RESULTS_DIR / "world_ablation.png")
        write_results(
            "world_ablation",
            "Sampler and loss ablations on the world's teachers (benchmarks.world_ablation)",
            asdict(settings),
            {"results": results},
            f"{markdown}\n\n![ablation curves]({png.relative_to(RESULTS_DIR.parent).as_posix()})\n",
        )
    return out


def _fmt(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def plot(results: list[dict], path: Path) -> Path:
    from .plot import Panel, Series, save_line_plot

    reward = Panel("Held-out reward (average of the three tasks)", "round", "reward")
    kl = Panel("KL to the teachers (ODE rollouts, held-out prompts)", "round", "KL", log_y=True)
    for result in results:
        rounds = [r["round"] for r in result["records"]]
        reward.series.append(Series(result["method"], rounds, [r["average"] for r in result["records"]]))
        kl.series.append(Series(result["method"], rounds, [r["kl"] for r in result["records"]]))
    save_line_plot([reward, kl], path, title="DiffusionOPD on the world: sampler and loss ablations")
    return Path(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--every", type=int, default=None)
    parser.add_argument("--eval_images", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--extra", default=None, help="JSON dict of DiffusionOPDConfig fields for every method.")
    args = parser.parse_args(argv)
    settings = AblationSettings.quick() if args.quick else AblationSettings()
    for name in ("rounds", "every", "eval_images"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.extra:
        settings.extra = json.loads(args.extra)
    out = run(settings, workers=args.workers, write=not args.quick)
    print(out["markdown"])
    return out


if __name__ == "__main__":
    main()
