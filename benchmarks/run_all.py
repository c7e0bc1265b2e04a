"""Run every benchmark (`make bench`), each in its own process, and report the wall time.

python -m benchmarks.run_all              # all, about 14-16 minutes on a 2-core CPU
python -m benchmarks.run_all --quick      # smoke check of every code path, about a minute
python -m benchmarks.run_all --only round_cost grad_variance
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import resource
import subprocess
import sys
import time

from .common import RESULTS_MD, cpu_model


BENCHMARKS = {
    "round_cost": ["-m", "benchmarks.round_cost"],
    "grad_variance": ["-m", "benchmarks.grad_variance"],
    "convergence": ["-m", "benchmarks.convergence"],
    "gpu_round_tiny": ["-m", "benchmarks.gpu_round", "--tiny"],
    "peak_memory": ["-m", "benchmarks.peak_memory"],
    "released_loop": ["-m", "benchmarks.released_loop"],
    "long_run": ["-m", "benchmarks.long_run"],
    "teacher_scale": ["-m", "benchmarks.teacher_scale"],
    "edit_round": ["-m", "benchmarks.edit_round"],
}


TAGS = tuple(
    f"[{name}]"
    for name in (
        "round_cost",
        "grad_variance",
        "convergence",
        "gpu_round",
        "peak_memory",
        "released_loop",
        "long_run",
        "teacher_scale",
        "edit_round",
    )
)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small configurations only (smoke check).")
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="Run only these.")
    ns = parser.parse_args(argv)
    names = ns.only or list(BENCHMARKS)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    durations, cpu_seconds, failures = {}, {}, []
    start = time.perf_counter()
    for name in names:
        command = [sys.executable, *BENCHMARKS[name]]
        if ns.quick and name != "gpu_round_tiny":
            command.append("--quick")
        if ns.quick:
            command.append("--no-write")
        print(f"[run_all] {name}: {' '.join(command[1:])}", flush=True)
        cpu_before = _children_cpu()
        began = time.perf_counter()
        tail: collections.deque[str] = collections.deque(maxlen=60)
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # streamed, so progress shows while a benchmark runs
                tail.append(line)
                if line.startswith(TAGS):
                    print(line, end="", flush=True)
        durations[name] = time.perf_counter() - began
        cpu_seconds[name] = _children_cpu() - cpu_before
        if proc.returncode != 0:
            failures.append(name)
            print("".join(tail), flush=True)
            print(f"[run_all] {name} FAILED (exit {proc.returncode})", flush=True)
        print(f"[run_all] {name}: {durations[name]:.0f}s wall, {cpu_seconds[name]:.0f}s CPU", flush=True)
    total = time.perf_counter() - start
    total_cpu = sum(cpu_seconds.values())
    summary = ", ".join(f"{k} {v:.0f}s ({cpu_seconds[k]:.0f}s CPU)" for k, v in durations.items())
    print(f"[run_all] total {total:.0f}s wall, {total_cpu:.0f}s CPU ({summary})", flush=True)
    if not ns.quick and RESULTS_MD.exists():
        date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        with RESULTS_MD.open("a") as handle:
            handle.write(
                f"\n## `make bench` run of {date}\n\n- machine: {cpu_model()}, {os.cpu_count()} cores\n"
                f"- wall time: {total / 60:.1f} min, CPU time of the benchmark processes {total_cpu / 60:.1f} min "
                f"(per benchmark, wall (CPU): {summary}); the load average at the end was "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
                + (f"\n- FAILED: {', '.join(failures)}" if failures else "")
                + "\n"
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
