"""Scale in the teacher count: round time and peak memory of a mixed-task DiffusionOPD round with 3, 30, 100 and 200
LoRA teachers at the same rows per round.

Every teacher is its own task (a toy LoRA teacher, `save_toy_lora`; the same 600 prompts dealt out over the tasks in
every case, so that only the number of teachers changes); a round draws
`tasks_per_round` tasks and `rows_per_round` rows (`DiffusionOPDConfig`), rolls them out together and runs one pass
per drawn teacher's adapter, so the work per round does not depend on how many teachers exist. Two placements:

- `device`: every teacher's weights on the device (the default);
- `host`: `max_teachers_on_device=budget`, the others on the host, copied in on use (least recently used out).

Either way the teachers are flat tensors in the trainer's `TeacherBank`, run through one shared slot adapter per
LoRA layout, so the model's modules do not grow with the teacher count.

Each case runs in `repeats` processes of its own (peaks do not leak): build, one warm-up round, `rounds` measured
rounds; the table gives the median round over all of them and the least peak (and the median one).

- Round time: wall seconds of a whole optimizer step (rollout, teacher passes, student passes, backward, step), and
  its CPU seconds (`time.process_time`, one torch thread), which other processes on a shared machine disturb less.
- Peak memory on CUDA: `torch.cuda.max_memory_allocated` over the measured rounds (reset before them). On a CPU
  there is no device allocator: the number is the process's peak resident set size (`ru_maxrss`) minus its resident
  size after the imports, over set-up and rounds; the host copies of host-resident teachers live in the same RAM there,
  so the host placement's saving is a GPU measurement (its "teacher bytes on device" column is the count the CUDA
  peak would see).
- Switch: the time of one switch to another teacher and back to the student (`AdapterSwitch.activate`: the teacher's
  slot adapter pointed at its weights); set-up: building the trainer (loading every teacher included).

Targets: round time at 200 teachers <= 1.2 x at 3; peak memory <= the 3-teacher peak + the extra adapters' bytes
(host placement: + the budget's bytes only, on CUDA; on a CPU its host copies count too, being in the same memory).

    python -m benchmarks.teacher_scale                       # tiny SD3 on the CPU, ~6 min (5 processes a case)
    python -m benchmarks.teacher_scale --preset small        # hidden 256, 4 blocks (the GPU variant: run on a GPU)
    python -m benchmarks.teacher_scale --quick --no-write    # smoke check
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

from .common import markdown_table, median, setup, write_results


RESULT_TAG = "[teacher_scale:result]"
COUNTS = (3, 30, 100, 200)
PROMPTS = 600  # 3 per task at 200 teachers
PRESETS = {
    # the test suite's tiny SD3: 2 blocks, hidden 32, 16x16 latents
    "tiny": {"pipeline": {}, "resolution": 32, "steps": 4},
    # the small SD3: 4 blocks, hidden 256, 32x32 latents (64 px with the tiny VAE)
    "small": {
        "pipeline": {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 64, "sample_size": 32},
        "resolution": 64,
        "steps": 10,
    },
}


def _pipeline(preset: str):
    from trl_diffusion_opd.testing import get_tiny_sd3_pipeline

    return get_tiny_sd3_pipeline(seed=0, with_t5=False, **PRESETS[preset]["pipeline"])


def save_teachers(preset: str, folder: Path, count: int) -> list[str]:
    """`count` toy LoRA teachers (rank 4 on the attention projections), written once per folder."""
    from trl_diffusion_opd.testing import save_toy_lora

    pipe = _pipeline(preset)
    paths = []
    for index in range(count):
        path = folder / f"teacher_{index:03d}"
        if not (path / "pytorch_lora_weights.safetensors").exists():
            save_toy_lora(pipe, path, seed=1000 + index, rank=4, std=0.05)
        paths.append(str(path))
    return paths


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Rounds(TrainerCallback):
    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.peak_bytes = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step == self.warmup and self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.start)
            self.cpu_times.append(time.process_time() - self.cpu_start)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)


def _switch_seconds(trainer, names: list[str], repeats: int = 20) -> float:
    """Seconds of one switch to another teacher (`AdapterSwitch.activate`: its slot pointed at its weights, one
    attribute write per adapted layer) and back to the student."""
    switch = trainer.adapters
    start = time.perf_counter()
    for index in range(repeats):
        switch.activate(names[index % len(names)])
        switch.activate(switch.student)
    return (time.perf_counter() - start) / repeats


def run_case(
    preset: str, teachers: list[str], placement: str, budget: int, rows: int, tasks_per_round: int, rounds: int
):
    """One case in this process. Returns the measurement."""
    from transformers.trainer_callback import PrinterCallback

    from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer

    baseline_rss = _rss_bytes()
    cfg = PRESETS[preset]
    tasks = {f"t{index:03d}": path for index, path in enumerate(teachers)}
    # one pool of prompts for every case, dealt out over the tasks: the prompt cache (every prompt's embeddings, made
    # before training) then weighs the same at any teacher count, and only the teachers differ
    pool = [f"scene {j}" for j in range(PROMPTS)]
    prompts = {task: pool[index :: len(tasks)] for index, task in enumerate(tasks)}
    start = time.perf_counter()
    args = DiffusionOPDConfig(
        output_dir=tempfile.mkdtemp(prefix="teacher_scale_"),
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        ema=False,
        max_sequence_length=1,
        seed=0,
        resolution=cfg["resolution"],
        num_inference_steps=cfg["steps"],
        max_steps=1 + rounds,
        tasks_per_round=tasks_per_round,
        rows_per_round=rows,
        max_teachers_on_device=budget if placement == "host" else None,
    )
    trainer = DiffusionOPDTrainer(_pipeline(preset), tasks, args=args, train_dataset=prompts)
    trainer.remove_callback(PrinterCallback)
    setup_s = time.perf_counter() - start
    device = torch.device(trainer.args.device)
    timer = _Rounds(device, warmup=1)
    trainer.add_callback(timer)
    trainer.train()
    names = list(tasks)
    bank = trainer.teacher_bank
    per_adapter = max(bank.teacher_bytes(name) for name in names)
    on_device = bank.resident_bytes()
    switch = _switch_seconds(trainer, names[: min(8, len(names))])
    peak = (
        timer.peak_bytes
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss
    )
    return {
        "teachers": len(teachers),
        "placement": placement,
        "budget": budget if placement == "host" else None,
        "device": str(device),
        "round_s": median(timer.times),
        "round_s_all": timer.times,
        "round_cpu_s": median(timer.cpu_times),
        "round_cpu_s_all": timer.cpu_times,
        "peak_bytes": peak,
        "adapter_bytes": per_adapter,
        "teacher_bytes_on_device": on_device,
        "host_copies": bank.copies,
        "switch_s": switch,
        "setup_s": setup_s,
    }


def _subprocess(ns, teachers_dir: Path, count: int, placement: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.teacher_scale",
        "--case",
        f"{count}:{placement}",
        "--teachers-dir",
        str(teachers_dir),
        "--preset",
        ns.preset,
        "--rows",
        str(ns.rows),
        "--tasks-per-round",
        str(ns.tasks_per_round),
        "--budget",
        str(ns.budget),
        "--rounds",
        str(ns.rounds),
    ]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"case {count}:{placement} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def _merge_runs(runs: list[dict]) -> dict:
    """One case measured in several processes: the rounds of all of them (median); the peaks' minimum, which the
    targets are read on (a process's peak resident set on a CPU is what it needs plus 0-2 MiB that varies from run to
    run with the allocator, so the least of several runs is the best estimate of the need), and their median; the
    other fields of the first run."""
    out = dict(runs[0])
    out["round_s_all"] = [t for r in runs for t in r["round_s_all"]]
    out["round_cpu_s_all"] = [t for r in runs for t in r["round_cpu_s_all"]]
    out["round_s"], out["round_cpu_s"] = median(out["round_s_all"]), median(out["round_cpu_s_all"])
    peaks = sorted(r["peak_bytes"] for r in runs)
    out["peak_bytes"], out["peak_bytes_median"], out["peak_bytes_all"] = peaks[0], median(peaks), peaks
    out["switch_s"] = median([r["switch_s"] for r in runs])
    out["setup_s"] = median([r["setup_s"] for r in runs])
    return out


def summarize(results: list[dict]) -> dict:
    """Ratios to the 3-teacher (smallest) round of the same placement, and the targets."""
    out = {}
    for placement in ("device", "host"):
        rows = sorted((r for r in results if r["placement"] == placement), key=lambda r: r["teachers"])
        if not rows:
            continue
        base = rows[0]
        for r in rows:
            r["time_ratio"] = r["round_s"] / base["round_s"]
            r["cpu_ratio"] = r["round_cpu_s"] / base["round_cpu_s"]
            # on a CPU the host copies of host-resident teachers sit in the one memory the peak measures, so there
            # the host placement's allowance is the device placement's; on CUDA it is the budget only
            on_host_too = placement == "device" or r["device"].startswith("cpu")
            extra = r["adapter_bytes"] * (r["teachers"] - base["teachers"]) if on_host_too else 0
            r["memory_allowance"] = base["peak_bytes"] + extra
            r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        top = rows[-1]
        out[placement] = {
            "time_ratio_max": top["time_ratio"],
            "cpu_ratio_max": top["cpu_ratio"],
            "time_target_met": top["time_ratio"] <= 1.2,
            "memory_target_met": all(r["peak_bytes"] <= r["memory_allowance"] for r in rows),
        }
    return out


HEADERS = [
    "teachers",
    "placement",
    "round (s)",
    "vs 3",
    "round CPU (s)",
    "vs 3",
    "peak memory (MiB): least (median)",
    "vs 3",
    "allowance (MiB)",
    "teacher bytes on device (MiB)",
    "switch (ms)",
    "set-up (s)",
]


def _row(r: dict) -> list:
    mib = 2**20
    return [
        r["teachers"],
        r["placement"] + (f" (budget {r['budget']})" if r["budget"] else ""),
        f"{r['round_s']:.3f}",
        f"**{r['time_ratio']:.2f}x**",
        f"{r['round_cpu_s']:.3f}",
        f"**{r['cpu_ratio']:.2f}x**",
        f"{r['peak_bytes'] / mib:.1f}"
        + (f" ({r['peak_bytes_median'] / mib:.1f})" if len(r.get("peak_bytes_all", [])) > 1 else ""),
        f"**{r['memory_ratio']:.2f}x**",
        f"{r['memory_allowance'] / mib:.1f}",
        f"{r['teacher_bytes_on_device'] / mib:.2f}",
        f"{1e3 * r['switch_s']:.3f}",
        f"{r['setup_s']:.1f}",
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--counts", type=int, nargs="*", default=list(COUNTS))
    parser.add_argument("--rows", type=int, default=6, help="Rows per round (every case).")
    parser.add_argument("--tasks-per-round", type=int, default=3)
    parser.add_argument("--budget", type=int, default=4, help="max_teachers_on_device of the host placement.")
    parser.add_argument("--rounds", type=int, default=3, help="Measured rounds per case (after one warm-up).")
    parser.add_argument("--placements", nargs="*", default=["device", "host"], choices=["device", "host"])
    parser.add_argument("--teachers-dir", default=None, help="Where the toy teachers are written (kept).")
    parser.add_argument("--quick", action="store_true", help="3 and 12 teachers, one measured round.")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--name", default="teacher_scale", help="Results file name (results/<name>.json).")
    parser.add_argument(
        "--repeats", type=int, default=5, help="Processes per case: rounds pooled, the least peak memory."
    )
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    setup()
    if ns.quick:
        ns.counts, ns.rounds, ns.repeats = [3, 12], 1, 1
    teachers_dir = Path(ns.teachers_dir or Path(tempfile.gettempdir()) / f"teacher_scale_{ns.preset}")
    teachers_dir.mkdir(parents=True, exist_ok=True)
    if ns.case:
        count, placement = ns.case.split(":")
        paths = save_teachers(ns.preset, teachers_dir, int(count))
        result = run_case(ns.preset, paths, placement, ns.budget, ns.rows, ns.tasks_per_round, ns.rounds)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return result
    save_teachers(ns.preset, teachers_dir, max(ns.counts))
    results = []
    for placement in ns.placements:
        for count in ns.counts:
            runs = [_subprocess(ns, teachers_dir, count, placement) for _ in range(ns.repeats)]
            result = _merge_runs(runs)
            print(f"[teacher_scale] {count} teachers, {placement}: {result['round_s']:.3f} s/round", flush=True)
            results.append(result)
    summary = summarize(results)
    table = markdown_table(HEADERS, [_row(r) for r in results])
    if not ns.no_write:
        config = {
            "preset": ns.preset,
            "rows_per_round": ns.rows,
            "tasks_per_round": ns.tasks_per_round,
            "budget": ns.budget,
            "rounds": ns.rounds,
            "repeats": ns.repeats,
            "prompts": PROMPTS,
        }
        write_results(
            ns.name,
            f"Scale in the teacher count (mixed-task rounds; {ns.name})",
            config,
            {"results": results, "summary": summary},
            table + "\n",
        )
    print(table)
    print(json.dumps(summary, indent=2))
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    main()
