"""Can one batched forward of several LoRA teachers beat separate calls on this machine?

A mixed-adapter batch (peft's `adapter_names=`) runs the base layers once over the rows of all K teachers and each
teacher's LoRA on its own rows, so it does the same arithmetic as K separate calls; what it can save is per-call
cost (kernel launches, adapter switches) and what it gains from larger matrix products. Its best case is therefore
one plain call over all K x R rows with a single adapter: this benchmark times K separate teacher calls of R rows
against that bound, on the `small` SD3 of `benchmarks/released_loop.py`. If the bound does not beat the separate calls,
no mixed batch can.

    python -m benchmarks.batched_teachers            # small SD3 on the CPU, about a minute; writes RESULTS.md
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch


def measure(preset: str = "small", teachers: int = 3, steps: int = 9, repeats: int = 3) -> dict:
    """Process CPU seconds (median of `repeats`) of `teachers` separate teacher calls vs one call over all rows."""
    from peft import LoraConfig

    from .common import median
    from .released_loop import PRESETS, STUDENT_TARGETS, TASKS, _prompts, build, preset_trainer

    settings = PRESETS[preset]
    pipe, paths, folder = build(preset, torch.device("cpu"), torch.float32)
    try:
        trainer = preset_trainer(
            preset, pipe, paths, folder, LoraConfig(r=8, lora_alpha=16, target_modules=STUDENT_TARGETS)
        )
        names = TASKS[:teachers]
        prompts = settings["prompts_per_task"]
        rows = prompts * steps
        cond = trainer.prompt_cache(_prompts(preset)[names[0]])
        cond = {k: v.repeat(steps, *([1] * (v.dim() - 1))) for k, v in cond.items()}
        generator = torch.Generator().manual_seed(0)
        x = trainer.family.init_latents(rows, settings["resolution"], generator)
        t = torch.full((rows,), 0.7)
        specs = {spec.name: (task, spec) for task, specs in trainer.teacher_specs.items() for spec in specs}

        def separate():
            for name in names:
                task, spec = specs[name]
                trainer.teacher_means(spec, task, x, t, t - 0.1, cond, 0.9)

        big_x = x.repeat(teachers, 1, 1, 1)
        big_cond = {k: v.repeat(teachers, *([1] * (v.dim() - 1))) for k, v in cond.items()}
        big_t = t.repeat(teachers)

        def together():
            task, spec = specs[names[0]]
            trainer.teacher_means(spec, task, big_x, big_t, big_t - 0.1, big_cond, 0.9)

        times = {}
        for label, function in (("separate", separate), ("one call", together)):
            function()  # warm-up
            samples = []
            for _ in range(repeats):
                start = time.process_time()
                function()
                samples.append(time.process_time() - start)
            times[label] = median(samples)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "preset": preset,
        "teachers": teachers,
        "rows_per_teacher": rows,
        "cfg": 4.5,
        "separate_s": times["separate"],
        "one_call_s": times["one call"],
        "bound_speedup": times["separate"] / times["one call"],
    }


def main(argv=None) -> dict:
    from .common import markdown_table, setup, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--no-write", action="store_true")
    ns = parser.parse_args(argv)
    setup()
    data = measure(ns.preset)
    print(
        f"[batched_teachers] {data['teachers']} teachers x {data['rows_per_teacher']} rows: separate "
        f"{data['separate_s']:.3f}s, one call {data['one_call_s']:.3f}s, bound {data['bound_speedup']:.3f}x",
        flush=True,
    )
    if not ns.no_write:
        text = (
            f"{data['teachers']} LoRA teachers, {data['rows_per_teacher']} rows each (3 prompts x 9 trained steps, "
            f"x2 with CFG {data['cfg']}), `{data['preset']}` SD3 of `benchmarks/released_loop.py`, float32, process "
            "CPU time, median of 3 after a warm-up. 'one call' is a single call over all rows with one adapter: the "
            "best case of a mixed-adapter batch, which does the same arithmetic plus a gather / scatter per LoRA "
            "layer.\n\n"
            + markdown_table(
                ["teachers", "rows per teacher", "separate calls (s)", "one call over all rows (s)", "bound speedup"],
                [
                    [
                        data["teachers"],
                        data["rows_per_teacher"],
                        data["separate_s"],
                        data["one_call_s"],
                        f"**{data['bound_speedup']:.3f}x**",
                    ]
                ],
            )
        )
        write_results("batched_teachers", "Several LoRA teachers in one batched forward", {}, data, text)
    return data


if __name__ == "__main__":
    main()
