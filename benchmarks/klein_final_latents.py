"""Why a FLUX.2 [klein] student's final pipeline latents move less towards its teachers than its KL falls.

Two toy LoRA teachers (the default LoRA targets, sharing part of their update as in `tests/test_flux2.py`) are
distilled into one student on the tiny klein pipeline, and on the tiny FLUX.1 pipeline for comparison, with the ODE
sampler, 4 steps at 32 px and no CFG. Per run it records:

- the trainer's KL drop (`compute_teacher_kl`, the first ⌊N·timestep_fraction⌋ steps) and the per-step KL on all N
  steps of the student's rollouts, before and after training;
- the drop of the distance of the pipeline's own final latents to each teacher,
  `1 - |student - teacher| / |base - teacher|`, with `Flux2KleinPipeline.__call__` / `FluxPipeline.__call__`
  (`output_type="latent"`) from the same noise and every adapter loaded with `load_lora_weights`;
- Adam's bias-corrected `sqrt(v)` of the student's LoRA-B weights at the end (median), to compare with `adam_epsilon`.

Variants: AdamW's default `adam_epsilon=1e-8` vs the `1e-12` of the package's test, `timestep_fraction` 0.99
(the default: the last sampler step is not trained) vs 1.0, and guidance 1 vs 4.

    python -m benchmarks.klein_final_latents                 # 2 families x 5 variants x 3 seeds, ~30 CPU-minutes
    python -m benchmarks.klein_final_latents --gradients     # first-round gradients of every tiny image family
    python -m benchmarks.klein_final_latents --quick --no-write
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from .common import markdown_table, setup, write_results


TRAIN_PROMPTS = {
    "geneval": ["a red circle", "a blue square", "two cats", "a green tree"],
    "ocr": ["the word cat", "a sign hi", "text abc", "a poster"],
}
EVAL_PROMPTS = {"geneval": ["a yellow star", "one dog"], "ocr": ["the word dog", "a label"]}
# name -> (tiny pipeline factory name in `trl_diffusion_opd.testing`, text length)
FAMILIES = {"flux2_klein": ("get_tiny_flux2_klein_pipeline", 48), "flux": ("get_tiny_flux_pipeline", 32)}
# `guidance`: the student's, the teachers' and the pipeline's (klein: CFG; FLUX.1: its guidance embedding).
VARIANTS = {
    "eps 1e-8, fraction 0.99": {"adam_epsilon": 1e-8, "timestep_fraction": 0.99},
    "eps 1e-12, fraction 0.99": {"adam_epsilon": 1e-12, "timestep_fraction": 0.99},
    "eps 1e-12, fraction 1.0": {"adam_epsilon": 1e-12, "timestep_fraction": 1.0},
    "eps 1e-12, fraction 0.99, guidance 4": {"adam_epsilon": 1e-12, "timestep_fraction": 0.99, "guidance": 4.0},
    "eps 1e-12, fraction 1.0, guidance 4": {"adam_epsilon": 1e-12, "timestep_fraction": 1.0, "guidance": 4.0},
}
RESOLUTION = 32


def _pipeline(family: str, seed: int):
    from trl_diffusion_opd import testing

    return getattr(testing, FAMILIES[family][0])(seed=seed)


def per_step_kl(trainer, prompts: dict[str, list[str]]) -> dict[str, list[float]]:
    """Mean KL per sampler step on all N steps (trained or not) of the student's rollouts, per task, at the
    evaluation seed of `compute_teacher_kl`."""
    fraction = trainer.args.timestep_fraction
    trainer.args.timestep_fraction = 1.0
    try:
        out = {}
        with torch.no_grad():
            for task, texts in prompts.items():
                rows = [{"prompt": p} for p in texts]
                generator = trainer._generator("eval", 0, task)
                _, kl = trainer.task_loss(trainer.model, task, rows, generator, backward=False)
                out[task] = kl.tolist()
    finally:
        trainer.args.timestep_fraction = fraction
    return out


def pipeline_latents(family: str, seed: int, adapter: str | None, prompts, x0, num_steps: int, guidance: float):
    """The final latents `__call__` returns (`output_type="latent"`) for a fresh base with `adapter` loaded."""
    pipe = _pipeline(family, seed)
    if adapter is not None:
        pipe.load_lora_weights(adapter)
    with torch.no_grad():
        return pipe(
            prompt=prompts,
            latents=x0,
            num_inference_steps=num_steps,
            height=RESOLUTION,
            width=RESOLUTION,
            guidance_scale=guidance,
            max_sequence_length=FAMILIES[family][1],
            output_type="latent",
        ).images


def adam_sqrt_v(trainer) -> float:
    """Median over the student's LoRA-B entries of Adam's bias-corrected sqrt(v), the denominator `adam_epsilon` is
    added to (LoRA-A starts with zero gradients, B being zero)."""
    beta2 = trainer.args.adam_beta2
    values = []
    for name, param in trainer.model.named_parameters():
        state = trainer.optimizer.state.get(param, {})
        if ".lora_B." in name and "exp_avg_sq" in state:
            step = float(state["step"])
            values.append((state["exp_avg_sq"] / (1 - beta2**step)).sqrt().flatten())
    return torch.cat(values).median().item()


def run(family: str, variant: str, seed: int, rounds: int = 80, learning_rate: float = 5e-3, steps: int = 4) -> dict:
    """One distillation of two toy teachers and its measurements (see the module docstring)."""
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback

    from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
    from trl_diffusion_opd.families.base import get_family
    from trl_diffusion_opd.testing import save_toy_lora

    options = dict(VARIANTS[variant])
    guidance = options.pop("guidance", 1.0)
    folder = Path(tempfile.mkdtemp(prefix="klein_final_latents_"))
    pipe = _pipeline(family, seed)
    targets = get_family(pipe).default_lora_targets
    teachers = {
        task: str(
            save_toy_lora(
                pipe,
                folder / task,
                seed=1 + index + 10 * seed,
                std=0.1,
                rank=2,
                shared_seed=7,
                specific_scale=0.3,
                target_modules=targets,
            )
        )
        for index, task in enumerate(TRAIN_PROMPTS)
    }
    args = DiffusionOPDConfig(
        output_dir=str(folder / "out"),
        max_steps=rounds,
        per_device_train_batch_size=2,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        ema=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10_000,
        max_sequence_length=FAMILIES[family][1],
        resolution=RESOLUTION,
        num_inference_steps=steps,
        guidance_scale=guidance,
        teacher_guidance_scale=guidance,
        **options,
    )
    peft_config = LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets)
    trainer = DiffusionOPDTrainer(pipe, teachers, args=args, train_dataset=TRAIN_PROMPTS, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    kl_before = trainer.compute_teacher_kl(EVAL_PROMPTS, use_ema=False)
    steps_before = per_step_kl(trainer, EVAL_PROMPTS)
    began = time.process_time()
    trainer.train()
    cpu = time.process_time() - began
    kl_after = trainer.compute_teacher_kl(EVAL_PROMPTS, use_ema=False)
    steps_after = per_step_kl(trainer, EVAL_PROMPTS)
    trainer.save_model(str(folder / "student"))
    result = {
        "family": family,
        "variant": variant,
        "seed": seed,
        "train_cpu_s": cpu,
        "sigmas": trainer.family.sigmas(steps, RESOLUTION).tolist(),
        "trained_steps": args.num_train_timesteps,
        "adam_sqrt_v": adam_sqrt_v(trainer),
        "tasks": {},
    }
    family_obj = trainer.family
    for task, prompts in EVAL_PROMPTS.items():
        x0 = family_obj.init_latents(len(prompts), RESOLUTION, torch.Generator().manual_seed(123))
        base = pipeline_latents(family, seed, None, prompts, x0, steps, guidance)
        teacher = pipeline_latents(family, seed, teachers[task], prompts, x0, steps, guidance)
        student = pipeline_latents(family, seed, str(folder / "student"), prompts, x0, steps, guidance)
        before, after = steps_before[task], steps_after[task]
        result["tasks"][task] = {
            "kl_drop_trained": 1 - kl_after[task] / kl_before[task],
            "kl_drop_all_steps": 1 - sum(after) / sum(before),
            "kl_step_before": before,
            "kl_step_after": after,
            "kl_drop_per_step": [1 - a / b for a, b in zip(after, before)],
            "last_step_share_before": before[-1] / sum(before),
            "latent_distance_drop": 1 - ((student - teacher).norm() / (base - teacher).norm()).item(),
        }
    return result


# Text lengths of the tiny pipelines' tests (SD3's CLIP-only tiny pipeline takes any).
GRADIENT_FAMILIES = {"flux2_klein": 48, "flux": 32, "sd3": 1, "zimage": 64, "qwenimage": 32, "wan": 16}


def gradient_scale(name: str, seed: int = 0) -> dict:
    """|gradient| of the student's LoRA-B entries in the first round (= Adam's bias-corrected sqrt(v) after one
    step) for the tiny pipeline `name`, with the same kind of teachers, prompts and 4-step ODE as `run`."""
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback

    from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
    from trl_diffusion_opd.families.base import get_family
    from trl_diffusion_opd.testing import TINY_PIPELINES, TINY_WAN_FRAMES, save_toy_lora

    folder = Path(tempfile.mkdtemp(prefix="klein_gradients_"))
    pipe = TINY_PIPELINES[name](seed=seed)
    targets = get_family(pipe).default_lora_targets
    teachers = {
        task: str(
            save_toy_lora(
                pipe,
                folder / task,
                seed=1 + index + 10 * seed,
                std=0.1,
                rank=2,
                shared_seed=7,
                specific_scale=0.3,
                target_modules=targets,
            )
        )
        for index, task in enumerate(TRAIN_PROMPTS)
    }
    video = {"num_frames": TINY_WAN_FRAMES} if name == "wan" else {}
    args = DiffusionOPDConfig(
        output_dir=str(folder / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-12,
        ema=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10_000,
        max_sequence_length=GRADIENT_FAMILIES[name],
        resolution=RESOLUTION,
        num_inference_steps=4,
        **video,
    )
    peft_config = LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets)
    trainer = DiffusionOPDTrainer(pipe, teachers, args=args, train_dataset=TRAIN_PROMPTS, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    beta2 = trainer.args.adam_beta2
    grads = torch.cat(
        [
            (trainer.optimizer.state[param]["exp_avg_sq"] / (1 - beta2)).sqrt().flatten()
            for n, param in trainer.model.named_parameters()
            if ".lora_B." in n and param in trainer.optimizer.state
        ]
    )
    return {
        "family": name,
        "median": grads.median().item(),
        "p90": grads.quantile(0.9).item(),
        "share_below_1e-8": (grads < 1e-8).float().mean().item(),
        "sigmas": trainer.family.sigmas(4, RESOLUTION).tolist(),
    }


def gradients_markdown(rows: list[dict]) -> str:
    table = [
        [
            r["family"],
            f"{r['median']:.2g}",
            f"{r['p90']:.2g}",
            f"{r['share_below_1e-8']:.0%}",
            " ".join(f"{s:.3f}" for s in r["sigmas"]),
        ]
        for r in rows
    ]
    return markdown_table(["tiny family", "median abs(g)", "90th pct abs(g)", "share < 1e-8", "sigmas (N=4)"], table)


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1%} ± {std:.1%}"


def summarize(results: list[dict]) -> list[dict]:
    """One row per (family, variant), task values pooled over seeds and tasks."""
    rows = []
    for family in FAMILIES:
        for variant in VARIANTS:
            runs = [r for r in results if r["family"] == family and r["variant"] == variant]
            if not runs:
                continue
            tasks = [t for r in runs for t in r["tasks"].values()]

            def pool(key, tasks=tasks):
                return [t[key] for t in tasks]

            rows.append(
                {
                    "family": family,
                    "variant": variant,
                    "runs": len(runs),
                    "last_sigma": runs[0]["sigmas"][-2],
                    "trained_steps": f"{runs[0]['trained_steps']} / {len(runs[0]['sigmas']) - 1}",
                    "last_step_share_before": pool("last_step_share_before"),
                    "kl_drop_trained": pool("kl_drop_trained"),
                    "kl_drop_all_steps": pool("kl_drop_all_steps"),
                    "kl_drop_last_step": [t["kl_drop_per_step"][-1] for t in tasks],
                    "latent_distance_drop": pool("latent_distance_drop"),
                    "adam_sqrt_v": [r["adam_sqrt_v"] for r in runs],
                }
            )
    return rows


HEADERS = [
    "family",
    "variant",
    "last step σ→0",
    "steps trained",
    "last step's share of KL at init",
    "trainer KL drop (trained steps)",
    "KL drop, all steps",
    "KL drop, last step",
    "1 - sqrt(1 - KL drop, all steps)",
    "final pipeline latents: distance drop",
    "Adam sqrt(v) (median)",
]


def to_markdown(rows: list[dict]) -> str:
    table = []
    for row in rows:
        predicted = [1 - math.sqrt(max(0.0, 1 - d)) for d in row["kl_drop_all_steps"]]
        table.append(
            [
                row["family"],
                row["variant"],
                f"{row['last_sigma']:.3f}",
                row["trained_steps"],
                _mean_std(row["last_step_share_before"]),
                _mean_std(row["kl_drop_trained"]),
                _mean_std(row["kl_drop_all_steps"]),
                _mean_std(row["kl_drop_last_step"]),
                _mean_std(predicted),
                _mean_std(row["latent_distance_drop"]) + f" ({min(row['latent_distance_drop']):.0%} min)",
                f"{statistics.median(row['adam_sqrt_v']):.2g}",
            ]
        )
    return markdown_table(HEADERS, table)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--learning_rate", type=float, default=5e-3)
    parser.add_argument("--workers", type=int, default=2, help="Runs in parallel, one process (one thread) each.")
    parser.add_argument(
        "--gradients",
        action="store_true",
        help="Instead: first-round |gradient| of the student's LoRA-B on every tiny image family (vs adam_epsilon).",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds, one seed (smoke check).")
    parser.add_argument("--no-write", action="store_true", help="Print only; do not write results files.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seeds = 2, args.seeds[:1]
    setup()
    if args.gradients:
        rows = [gradient_scale(name) for name in GRADIENT_FAMILIES]
        markdown = gradients_markdown(rows)
        print(markdown)
        if not args.no_write:
            title = "First-round LoRA-B gradients of the tiny families (benchmarks.klein_final_latents --gradients)"
            write_results("klein_gradient_scale", title, {"rounds": 1, "seed": 0}, {"results": rows}, markdown)
        return rows
    jobs = [
        (f, v, s, args.rounds, args.learning_rate) for f in args.families for v in args.variants for s in args.seeds
    ]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=setup) as pool:
            results = list(pool.map(run, *zip(*jobs)))
    else:
        results = [run(*job) for job in jobs]
    markdown = to_markdown(summarize(results))
    print(markdown)
    if not args.no_write:
        config = {k: v for k, v in vars(args).items() if k not in ("quick", "no_write", "workers")}
        title = "FLUX.2 [klein]: trained KL vs the pipeline's final latents (benchmarks.klein_final_latents)"
        write_results("klein_final_latents", title, config, {"results": results}, markdown)
    return results


if __name__ == "__main__":
    main()
