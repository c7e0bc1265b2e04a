"""Issue #5, item 5: peak memory of one DiffusionOPD round with 1 vs 3 LoRA teachers, and with 3 full-weight teachers
with and without `teacher_offload`.

Every case runs in its own process (peaks do not leak between cases): the pipeline is built from a config with
random weights (`benchmarks.gpu_round.build_pipeline`, random prompt embeddings of the real shapes, no text encoders
or VAE), the trainer runs one warm-up round (optimizer states exist afterwards) and one measured round.

- On CUDA the number is `torch.cuda.max_memory_allocated` over the measured round (reset right before it): what the
  round needs, static weights and optimizer states included.
- On a CPU there is no allocator peak; the number is the process's peak resident set size (`ru_maxrss`) minus its
  resident size right after the imports, over set-up, warm-up and the measured round. Offloading a full teacher
  moves it to the CPU, which on a CPU-only run is where it already is, so the two full-teacher cases coincide there:
  the offload saving is a GPU measurement.

Cases: `lora_1` (one task, one LoRA teacher), `lora_3` (three tasks, three LoRA teachers: the target is
peak(lora_3) / peak(lora_1) <= 1.10, since teacher passes keep no activations and a LoRA teacher adds only its
adapter weights), `full_3` (three full-weight teachers resident on the device), `full_3_offload` (the same with
`teacher_offload=True`: one full teacher on the device at a time).

    python -m benchmarks.peak_memory                    # small SD3 (4 blocks, hidden 256, 32x32 latents), ~1 min
    python -m benchmarks.peak_memory --preset sd35m     # SD3.5-Medium config on one GPU (bf16, 512 px)
    python -m benchmarks.peak_memory --quick --no-write # smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .common import make_trainer, markdown_table, setup, write_results


RESULT_TAG = "[peak_memory:result]"
CASES = {
    "lora_1": {"tasks": 1, "teachers": "lora", "offload": False},
    "lora_3": {"tasks": 3, "teachers": "lora", "offload": False},
    "full_3": {"tasks": 3, "teachers": "full", "offload": False},
    "full_3_offload": {"tasks": 3, "teachers": "full", "offload": True},
}
# "small" is the issue's small SD3 (hidden 256 = 4 heads x 64, 4 blocks); at 256 px SD3's 8x VAE factor gives 32x32
# latents. "tiny" is the smoke check. "sd35m" is SD3.5-Medium's published config.
PRESETS = {
    "tiny": {
        "overrides": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "sample_size": 16},
        "resolution": 64,
        "steps": 3,
        "max_sequence_length": 4,
        "prompts_per_task": 1,
        "gradient_checkpointing": False,
    },
    "small": {
        "overrides": {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 64, "sample_size": 32},
        "resolution": 256,
        "steps": 10,
        "max_sequence_length": 8,
        "prompts_per_task": 3,
        "gradient_checkpointing": False,
    },
    "sd35m": {
        "overrides": {},
        "resolution": 512,
        "steps": 10,
        "max_sequence_length": 128,
        "prompts_per_task": 2,
        "gradient_checkpointing": True,
    },
}


def transformer_config(preset: str) -> dict:
    from .gpu_round import SD35_MEDIUM

    overrides = PRESETS[preset]["overrides"]
    if not overrides:
        return dict(SD35_MEDIUM)
    width = overrides["num_attention_heads"] * overrides["attention_head_dim"]
    return {
        **SD35_MEDIUM,
        **overrides,
        "joint_attention_dim": width,
        "caption_projection_dim": width,
        "pooled_projection_dim": width,
        "pos_embed_max_size": 2 * overrides["sample_size"],
        "dual_attention_layers": (0,),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _param_bytes(module: torch.nn.Module, device: torch.device) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type == device.type)


class _MeasuredRound(TrainerCallback):
    """Resets the CUDA peak right before round `warmup + 1` and reads it right after."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.static_bytes = self.peak_bytes = None
        self.round_s = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                self.static_bytes = torch.cuda.memory_allocated(self.device)
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup + 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.round_s = time.perf_counter() - self.start


def run_case(case: str, preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """One case in this process: build, warm up one round, measure one round. Returns the measurement (bytes, s)."""
    from diffusers import SD3Transformer2DModel

    from trl_diffusion_opd.families.sd3 import SD3Family

    from .gpu_round import PROMPTS, TASKS, TEACHER_GUIDANCE, RandomPromptEmbeddings, build_pipeline, save_random_lora

    baseline_rss = _rss_bytes()
    spec, settings = CASES[case], PRESETS[preset]
    config = transformer_config(preset)
    tasks = TASKS[: spec["tasks"]]
    pipe = build_pipeline(config, device, dtype, seed=seed)
    transformer = pipe.transformer
    base_bytes = _param_bytes(transformer, device)
    pipe.encode_prompt = RandomPromptEmbeddings(transformer, settings["max_sequence_length"])
    with tempfile.TemporaryDirectory() as folder:
        if spec["teachers"] == "lora":
            teachers = {
                task: str(save_random_lora(transformer, Path(folder) / task, SD3Family.default_lora_targets, 32, i))
                for i, task in enumerate(tasks)
            }
        else:
            teachers = {}
            for i, task in enumerate(tasks):
                torch.manual_seed(seed + 1 + i)
                with torch.device(device):  # random init on the accelerator is fast; the trainer offloads it
                    teachers[task] = SD3Transformer2DModel(**config).to(dtype)
        trainer = make_trainer(
            pipe,
            teachers,
            str(Path(folder) / "out"),
            eval_prompts={},
            train_prompts={task: PROMPTS[task][: settings["prompts_per_task"]] for task in tasks},
            resolution=settings["resolution"],
            num_inference_steps=settings["steps"],
            per_device_train_batch_size=settings["prompts_per_task"],
            max_sequence_length=settings["max_sequence_length"],
            guidance_scale=4.5,
            teacher_guidance_scale={task: TEACHER_GUIDANCE[task] for task in tasks},
            teacher_offload=spec["offload"],
            gradient_checkpointing=settings["gradient_checkpointing"],
            use_cpu=device.type == "cpu",
            max_steps=2,
        )
        del teachers
        clock = _MeasuredRound(device, warmup=1)
        trainer.add_callback(clock)
        trainer.train()
    resident_teacher_bytes = sum(_param_bytes(module, device) for module in trainer.full_teachers.values())
    # ru_maxrss is in KiB; the current RSS bounds it from below in case the kernel's high-water mark lags
    peak_rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _rss_bytes())
    return {
        "case": case,
        **spec,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "base_param_bytes": base_bytes,
        "resident_full_teacher_bytes_after": resident_teacher_bytes,
        "round_static_bytes": clock.static_bytes,
        "round_peak_bytes": clock.peak_bytes,
        "process_peak_rss_bytes": peak_rss,
        "process_rss_delta_bytes": peak_rss - baseline_rss,
        "measured_round_s": clock.round_s,
    }


def _run_in_subprocess(case: str, ns: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.peak_memory", "--worker", case, "--preset", ns.preset]
    if ns.device:
        command += ["--device", ns.device]
    if ns.dtype:
        command += ["--dtype", ns.dtype]
    # glibc keeps freed heap pages and fragments them, so on a CPU the RSS high-water mark drifts up with every
    # round; serving every allocation over 64 KiB by mmap returns freed tensors to the OS at once and makes the
    # peak RSS follow the live tensors (no effect on CUDA memory).
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"case": case, **CASES[case], "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.3f}"


def summarize(results: list[dict]) -> dict:
    """The measured peak per case (CUDA peak of the round, else the process RSS delta) and the two ratios."""
    by_case = {r["case"]: r for r in results if "error" not in r}

    def peak(case):
        r = by_case.get(case)
        if r is None:
            return None
        return r["round_peak_bytes"] if r["round_peak_bytes"] is not None else r["process_rss_delta_bytes"]

    def ratio(a, b):
        return None if peak(a) is None or peak(b) is None else peak(a) / peak(b)

    return {
        "peak_bytes": {case: peak(case) for case in CASES},
        "lora_3_over_lora_1": ratio("lora_3", "lora_1"),
        "full_3_offload_over_full_3": ratio("full_3_offload", "full_3"),
        "full_3_offload_over_lora_3": ratio("full_3_offload", "lora_3"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--quick", action="store_true", help="The tiny preset (smoke check).")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="Default: bf16 on GPU."
    )
    parser.add_argument("--worker", default=None, choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    ns = parser.parse_args(argv)
    if ns.quick:
        ns.preset = "tiny"
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, ns.dtype) if ns.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    setup(1 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    if ns.worker:
        print(RESULT_TAG + json.dumps(run_case(ns.worker, ns.preset, device, dtype)), flush=True)
        return {}

    start = time.perf_counter()
    results = []
    for case in ns.cases:
        result = _run_in_subprocess(case, ns)
        results.append(result)
        if "error" in result:
            print(f"[peak_memory] {case}: FAILED {result['error']}", flush=True)
            continue
        peak = result["round_peak_bytes"] or result["process_rss_delta_bytes"]
        print(
            f"[peak_memory] {case}: peak {peak / 2**30:.3f} GiB "
            f"({'CUDA round peak' if result['round_peak_bytes'] is not None else 'process RSS delta'}), "
            f"measured round {result['measured_round_s']:.2f}s",
            flush=True,
        )
    summary = summarize(results)
    total_s = time.perf_counter() - start
    for key in ("lora_3_over_lora_1", "full_3_offload_over_full_3"):
        if summary[key] is not None:
            print(f"[peak_memory] {key} = {summary[key]:.3f}", flush=True)

    cuda = device.type == "cuda"
    rows = [
        [
            r["case"],
            r["tasks"],
            r["teachers"],
            "yes" if r["offload"] else "no",
            _gib(r.get("base_param_bytes")),
            _gib(r.get("round_static_bytes")),
            _gib(r.get("round_peak_bytes")),
            _gib(r.get("process_rss_delta_bytes")),
            "-" if r.get("measured_round_s") is None else f"{r['measured_round_s']:.2f}",
            r.get("error", ""),
        ]
        for r in results
    ]
    fmt = lambda value: "-" if value is None else f"**{value:.3f}**"  # noqa: E731
    settings = PRESETS[ns.preset]
    markdown = (
        f"Preset `{ns.preset}` ({settings['resolution']} px, N={settings['steps']}, {settings['prompts_per_task']} "
        f"prompts per task, student CFG 4.5, gradient checkpointing "
        f"{'on' if settings['gradient_checkpointing'] else 'off'}), {str(dtype).replace('torch.', '')} on {device}; "
        f"every case in a fresh process, one warm-up round then one measured round. "
        + (
            "Peak = `torch.cuda.max_memory_allocated` over the measured round. "
            if cuda
            else "No CUDA: peak = process peak RSS minus RSS after imports (set-up + 2 rounds); offload is a no-op "
            "on a CPU-only run, so `full_3` and `full_3_offload` measure the same thing here. "
        )
        + f"Whole benchmark {total_s:.0f}s.\n\n"
        f"- peak(lora_3) / peak(lora_1) = {fmt(summary['lora_3_over_lora_1'])} (target <= 1.10)\n"
        f"- peak(full_3_offload) / peak(full_3) = {fmt(summary['full_3_offload_over_full_3'])}\n"
        f"- peak(full_3_offload) / peak(lora_3) = {fmt(summary['full_3_offload_over_lora_3'])}\n\n"
        + markdown_table(
            [
                "case",
                "tasks",
                "teachers",
                "offload",
                "base params (GiB)",
                "allocated before round (GiB)",
                "CUDA round peak (GiB)",
                "process RSS delta (GiB)",
                "measured round (s)",
                "error",
            ],
            rows,
        )
    )
    run_config = {
        "preset": ns.preset,
        "device": str(device),
        "dtype": str(dtype),
        **{k: v for k, v in settings.items() if k != "overrides"},
        "transformer": transformer_config(ns.preset),
    }
    data = {"results": results, "summary": summary, "total_s": total_s}
    if not ns.no_write:
        name = "peak_memory" if not cuda else f"peak_memory_{ns.preset}_cuda"
        write_results(name, f"Peak memory of a round, {ns.preset} ({device.type})", run_config, data, markdown)
    print(markdown, flush=True)
    return data


if __name__ == "__main__":
    main()
