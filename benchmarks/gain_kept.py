"""How much of each teacher's gain one student keeps on the world, and what limits it.

Each variant distils some of the shipped world teachers with `world.demo`'s full-size settings (60 rounds of 4
prompts per task, lr 1e-3, ODE, rank 16) plus its own `DiffusionOPDConfig` fields, then scores the student on 256
held-out scenes per task at the teachers' evaluation seed (`world.teachers.score_pipeline`, so the base's and the
teachers' scores in `world/assets/teachers/index.json` are on the same scenes and noise). The share of a teacher's
gain kept is (student − base) / (teacher − base) on that teacher's task.

    python -m benchmarks.gain_kept                      # every variant (about 10 CPU-minutes each)
    python -m benchmarks.gain_kept --variants three_tasks steps_trained
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from .common import RESULTS_DIR, markdown_table, setup, write_results


TASKS = ("composition", "letters", "aesthetic")
VARIANTS = {
    "three_tasks": {"tasks": TASKS},
    "rank_32": {"tasks": TASKS, "rank": 32},
    "aesthetic_prompt_tag": {"tasks": TASKS, "extra": {"task_prompt_templates": {"aesthetic": "{prompt}, pretty"}}},
    "steps_trained": {"tasks": TASKS, "extra": {"task_timestep_fraction": {"composition": 0.5}}},
    "letters_aesthetic": {"tasks": ("letters", "aesthetic")},
    # composition's KL on its trained (high-noise) steps is a fraction of the others': weigh its share of the update up
    "steps_trained_composition_x3": {
        "tasks": TASKS,
        "extra": {"task_timestep_fraction": {"composition": 0.5}, "task_weights": {"composition": 3.0}},
    },
}


def run_variant(name: str, folder: str, seed: int = 0, rounds: int = 60, eval_images: int = 256) -> dict:
    setup(1)
    from trl_diffusion_opd.world.demo import DemoConfig, distil
    from trl_diffusion_opd.world.teachers import load_teacher_pipeline, score_pipeline

    variant = VARIANTS[name]
    extra = dict(variant.get("extra", {}))
    config = DemoConfig(output_dir=folder, full=True, progress=False, seed=seed)
    config.rounds, config.lora_rank, config.extra = rounds, variant.get("rank", 16), extra
    began = time.process_time()
    trainer = distil({task: f"world:{task}" for task in variant["tasks"]}, config, Path(folder) / "student")
    cpu = time.process_time() - began
    scores = score_pipeline(
        load_teacher_pipeline(Path(folder) / "student"),
        num_images=eval_images,
        prompt_templates=extra.get("task_prompt_templates"),
    )
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"variant": name, "seed": seed, "train_cpu_s": cpu, "scores": scores, "final_log": log[-1] if log else {}}


def kept(scores: dict, index: dict) -> dict[str, float]:
    """Share of each teacher's gain over the base kept by a student (`scores`), per task."""
    out = {}
    for task in TASKS:
        base = index[task]["scores"]["base"][task]
        teacher = index[task]["scores"]["teacher"][task]
        out[task] = (scores[task] - base) / (teacher - base)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    from trl_diffusion_opd.world.teachers import shipped_teachers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output_dir", default=str(RESULTS_DIR / "gain_kept_runs"))
    args = parser.parse_args(argv)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(run_variant, name, str(Path(args.output_dir) / name), args.seed) for name in args.variants
        ]
        results = [future.result() for future in futures]
    index = shipped_teachers()
    rows = []
    for result in results:
        share = kept(result["scores"], index)
        rows.append(
            [result["variant"], *[f"{result['scores'][t]:.3f}" for t in TASKS], *[f"{share[t]:.0%}" for t in TASKS]]
        )
    headers = ["variant", *TASKS, *[f"{t} gain kept" for t in TASKS]]
    table = markdown_table(headers, rows)
    write_results(
        "gain_kept",
        "Share of each teacher's gain kept by one student (benchmarks.gain_kept)",
        vars(args),
        {"results": results},
        table,
    )
    print(table)
    print(json.dumps({r["variant"]: r["train_cpu_s"] for r in results}))
    return results


if __name__ == "__main__":
    main()
