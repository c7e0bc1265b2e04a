"""Long runs do not grow: the tiny config trained for 50 and for 500 rounds, each in its own one-thread process.

Each run is `trl-diffusion-opd train --config examples/configs/tiny.yaml` (`tiny:sd3`, two `toy:` LoRA teachers, 10
prompts, 4 inference steps at 32 px, logging every 10 rounds) built through the command's own parser and
`build_trainer`, with `ema: true` (every round) so that the EMA is in the loop, and no saving. Recorded per run:

- the process's peak resident set size (`ru_maxrss`, import and set-up included) and its current RSS at round 50
  and at the end (`/proc/self/statm`), with glibc's default allocator (what a user's run gets);
- on CUDA, `torch.cuda.max_memory_allocated` and the allocated bytes at round 50 and at the end;
- what could grow with the rounds: the prompt cache's entries (an LRU of `prompt_cache_size`), the largest number
  of values held in `trainer._metrics` between two logging steps (cleared by `log()`), the EMA's shadow tensors
  and bytes, `trainer.state.log_history` (the Trainer's own list: one dict per logging step, kept for
  `trainer_state.json`) with its approximate size, and the number of objects the garbage collector tracks.

The target: the peak RSS (and on CUDA the allocated peak) after 500 rounds within 5 % of the one after 50.

    python -m benchmarks.long_run                    # 50 vs 500 rounds, about 3 minutes on a 2-core CPU
    python -m benchmarks.long_run --quick --no-write # 5 vs 20 rounds (smoke check)
"""

from __future__ import annotations

import argparse
import gc
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

from .common import markdown_table, setup, write_results


RESULT_TAG = "[long_run:result]"
ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "examples" / "configs" / "tiny.yaml"
TARGET = 1.05


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _deep_bytes(entries: list[dict]) -> int:
    """Approximate bytes of a list of flat dicts of numbers and strings (the log history)."""
    total = sys.getsizeof(entries)
    for entry in entries:
        total += sys.getsizeof(entry) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in entry.items())
    return total


class _Probe(TrainerCallback):
    """Samples what could grow, every round, and snapshots it at round `mark` and at the end."""

    def __init__(self, trainer, mark: int):
        self.trainer, self.mark = trainer, mark
        self.max_metric_values = 0
        self.max_prompt_cache = 0
        self.snapshots: dict[str, dict] = {}
        self.rss_trace: list[tuple[int, int]] = []  # (round, RSS) every `mark` rounds

    def snapshot(self) -> dict:
        trainer = self.trainer
        ema = trainer.ema
        shadow = list(ema.shadow_params) if ema is not None else []
        snap = {
            "round": trainer.state.global_step,
            "rss_bytes": _rss_bytes(),
            "log_history_entries": len(trainer.state.log_history),
            "log_history_bytes": _deep_bytes(trainer.state.log_history),
            "prompt_cache_entries": len(trainer.prompt_cache),
            "metric_keys": len(trainer._metrics),
            "ema_tensors": len(shadow),
            "ema_bytes": sum(t.numel() * t.element_size() for t in shadow),
            "gc_objects": len(gc.get_objects()),
        }
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            snap["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        return snap

    def on_train_begin(self, args, state, control, **kwargs):
        self.snapshots["start"] = self.snapshot()

    def on_step_end(self, args, state, control, **kwargs):
        # `on_step_end` runs before the Trainer logs this round: `_metrics` holds its most values here
        metrics = self.trainer._metrics
        self.max_metric_values = max(self.max_metric_values, sum(len(values) for values in metrics.values()))
        self.max_prompt_cache = max(self.max_prompt_cache, len(self.trainer.prompt_cache))
        if state.global_step == self.mark:
            self.snapshots["mark"] = self.snapshot()
        if state.global_step % self.mark == 0:
            self.rss_trace.append((state.global_step, _rss_bytes()))


def run_child(rounds: int, mark: int) -> dict:
    """Train the tiny config for `rounds` rounds in this process; returns the measurements."""
    from transformers.trainer_callback import PrinterCallback

    from trl_diffusion_opd.scripts.train import build_trainer, make_parser

    with tempfile.TemporaryDirectory() as folder:
        argv = ["--config", str(TINY_CONFIG), "--output_dir", folder, "--max_steps", str(rounds)]
        argv += ["--ema", "true", "--ema_update_interval", "1", "--disable_tqdm", "true", "--report_to", "none"]
        script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
        trainer = build_trainer(script_args, training_args, model_args)
        trainer.remove_callback(PrinterCallback)
        probe = _Probe(trainer, mark)
        trainer.add_callback(probe)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
        wall_s = time.perf_counter() - start
        end = probe.snapshot()
    peak_rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, end["rss_bytes"])
    return {
        "rounds": rounds,
        "wall_s": wall_s,
        "device": str(trainer.args.device),
        "peak_rss_bytes": peak_rss,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "at_start": probe.snapshots.get("start"),
        "at_mark": probe.snapshots.get("mark"),
        "rss_trace": probe.rss_trace,
        "at_end": end,
        "max_metric_values": probe.max_metric_values,
        "max_prompt_cache_entries": probe.max_prompt_cache,
        "prompt_cache_size": trainer.prompt_cache.max_size,
        "logging_steps": trainer.args.logging_steps,
    }


def run_in_subprocess(rounds: int, mark: int) -> dict:
    """`run_child` in a fresh one-thread process (peaks do not leak between runs)."""
    command = [sys.executable, "-m", "benchmarks.long_run", "--child", str(rounds), "--mark", str(mark)]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"rounds": rounds, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def summarize(short: dict, long: dict) -> dict:
    """Ratios of the long run to the short one (peak RSS, CUDA peak) and the RSS drift inside the long run."""

    def ratio(key):
        a, b = long.get(key), short.get(key)
        return None if a is None or b is None else a / b

    drift = None
    if long.get("at_mark") and long.get("at_end"):
        drift = long["at_end"]["rss_bytes"] / long["at_mark"]["rss_bytes"]
    slope = None
    trace = long.get("rss_trace") or []
    if len(trace) >= 2:  # least-squares slope of the RSS over the rounds, from round `mark` on
        xs, ys = [x for x, _ in trace], [y for _, y in trace]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    peak = ratio("peak_rss_bytes")
    return {
        "peak_rss_ratio": peak,
        "cuda_peak_ratio": ratio("cuda_peak_bytes"),
        "rss_end_over_mark": drift,
        "rss_slope_bytes_per_round": slope,
        "within_target": None if peak is None else bool(peak <= TARGET and (ratio("cuda_peak_bytes") or 1) <= TARGET),
    }


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=50, help="Rounds of the short run.")
    parser.add_argument("--long", type=int, default=500, help="Rounds of the long run.")
    parser.add_argument("--quick", action="store_true", help="5 vs 20 rounds (smoke check).")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mark", type=int, default=50, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.quick:
        ns.short, ns.long = 5, 20
    setup(1)
    if ns.child is not None:
        print(RESULT_TAG + json.dumps(run_child(ns.child, ns.mark)), flush=True)
        return {}

    results = []
    for rounds in (ns.short, ns.long):
        result = run_in_subprocess(rounds, mark=ns.short)
        results.append(result)
        if "error" in result:
            print(f"[long_run] {rounds} rounds: FAILED {result['error']}", flush=True)
            return {"results": results}
        print(
            f"[long_run] {rounds} rounds: {result['wall_s']:.0f}s, peak RSS {_mib(result['peak_rss_bytes'])} MiB, "
            f"CUDA peak {_mib(result['cuda_peak_bytes'])} MiB, log_history {result['at_end']['log_history_entries']}",
            flush=True,
        )
    short, long = results
    summary = summarize(short, long)
    print(f"[long_run] peak RSS {ns.long} / {ns.short} rounds = {summary['peak_rss_ratio']:.3f}", flush=True)

    rows = []
    for r in results:
        end, mark, begin = r["at_end"], r["at_mark"] or {}, r["at_start"] or {}
        bold = lambda value: "-" if value is None else f"**{value:.3f}**"  # noqa: E731
        rows.append(
            [
                r["rounds"],
                f"{r['wall_s']:.0f}",
                _mib(begin.get("rss_bytes")),
                _mib(r["peak_rss_bytes"]),
                bold(r["peak_rss_bytes"] / short["peak_rss_bytes"]),
                _mib(mark.get("rss_bytes")),
                _mib(end["rss_bytes"]),
                _mib(r["cuda_peak_bytes"]),
                f"{end['log_history_entries']} ({end['log_history_bytes'] / 1024:.1f} KiB)",
                f"{r['max_prompt_cache_entries']} / {r['prompt_cache_size']}",
                r["max_metric_values"],
                f"{end['ema_tensors']} ({end['ema_bytes'] / 1024:.0f} KiB)",
                f"{mark.get('gc_objects', '-')} → {end['gc_objects']}",
            ]
        )
    headers = [
        "rounds",
        "wall (s)",
        "RSS before training (MiB)",
        "peak RSS (MiB)",
        f"peak RSS / {ns.short} rounds",
        f"RSS at round {ns.short} (MiB)",
        "RSS at the end (MiB)",
        "CUDA peak (MiB)",
        "log_history",
        "prompt cache (max / size)",
        "`_metrics` values (max)",
        "EMA tensors",
        f"gc objects (round {ns.short} → end)",
    ]
    markdown = markdown_table(headers, rows)
    if summary["rss_slope_bytes_per_round"] is not None:
        markdown += (
            f"\n\nRSS of the {ns.long}-round run every {ns.short} rounds (MiB): "
            + ", ".join(f"{rss / 2**20:.1f}" for _, rss in long["rss_trace"])
            + f"; least-squares slope {summary['rss_slope_bytes_per_round'] / 1024:.2f} KiB per round."
        )
    config = {
        "config": "examples/configs/tiny.yaml + ema=true, ema_update_interval=1",
        "short": ns.short,
        "long": ns.long,
        "device": short["device"],
        "threads": 1,
    }
    if not ns.no_write:
        write_results(
            "long_run",
            "Long runs do not grow (tiny config, 50 vs 500 rounds)",
            config,
            {"results": results, "summary": summary},
            markdown,
        )
    return {"results": results, "summary": summary, "markdown": markdown}


if __name__ == "__main__":
    main()
