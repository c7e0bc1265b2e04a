"""Shared helpers of the benchmarks: machine description, timing, trainers on tiny pipelines, result files."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch


BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"

# Prompts of up to three toy tasks; the held-out ones are used for evaluation only.
TASK_PROMPTS = {
    "geneval": ["a red circle", "two blue squares", "a green cat", "a dog left of a car", "three yellow stars"],
    "ocr": ["the word hello", "a sign that says open", "the letters abc", "a label reading 42", "text: stop"],
    "aes": ["a calm lake at dawn", "a portrait in soft light", "misty mountains", "a golden field", "a quiet street"],
}
HELD_OUT_PROMPTS = {
    "geneval": ["a purple triangle", "four black dots", "a bird above a tree"],
    "ocr": ["the word world", "a poster that says sale", "the number 7"],
    "aes": ["a sunset over the sea", "a forest in autumn", "a snowy village"],
}


def setup(num_threads: int | None = None) -> int:
    """Fix the torch thread count and silence library chatter. Returns the thread count.

    The default is 1 thread (`BENCH_NUM_THREADS` overrides): on a small shared CPU, OpenMP's spinning barriers make
    multi-threaded kernels 10x slower whenever another process holds a core, which swamps any measurement.
    """
    if num_threads is None:
        num_threads = int(os.environ.get("BENCH_NUM_THREADS", "1"))
    torch.set_num_threads(num_threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("transformers", "diffusers", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - logging helpers moved
        pass
    return num_threads


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import diffusers
        import peft
        import transformers

        info["diffusers"] = diffusers.__version__
        info["transformers"] = transformers.__version__
        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else ""
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads){gpu}; torch {info['torch']}, "
        f"diffusers {info.get('diffusers', '?')}, transformers {info.get('transformers', '?')}, "
        f"peft {info.get('peft', '?')}, Python {info['python']}"
    )


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    title: str,
    config: dict[str, Any],
    data: dict[str, Any],
    markdown: str,
    results_dir: Path | None = None,
    results_md: Path | None = None,
) -> Path:
    """Write `results/<name>.json` and append a dated section to `RESULTS.md`. Returns the JSON path."""
    results_dir = Path(results_dir or RESULTS_DIR)
    results_md = Path(results_md or RESULTS_MD)
    results_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    payload = {"name": name, "title": title, "date": date, "machine": info, "config": config, **data}
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    config_line = ", ".join(f"{k}={v}" for k, v in config.items())
    section = (
        f"\n## {title}\n\n"
        f"- date: {date}\n- machine: {machine_line(info)}\n- config: {config_line}\n"
        f"- raw data: `benchmarks/results/{name}.json`\n\n{markdown.strip()}\n"
    )
    if not results_md.exists():
        results_md.write_text(
            "# Benchmark results\n\nAppended by `make bench` (`python -m benchmarks.run_all`); newest at the bottom.\n"
        )
    with results_md.open("a") as handle:
        handle.write(section)
    return path


# ---------------------------------------------------------------------------------------------- pipelines & trainers
def small_sd3_pipeline(seed: int = 0, num_layers: int = 4, heads: int = 4, head_dim: int = 64, latent_side: int = 32):
    """The issue's "small SD3": 4 MMDiT blocks, hidden 256, 32x32 latents (image side 64 px with the tiny VAE)."""
    from trl_diffusion_opd.testing import get_tiny_sd3_pipeline

    return get_tiny_sd3_pipeline(
        seed=seed,
        with_t5=False,
        num_layers=num_layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        sample_size=latent_side,
    )


def small_flux_pipeline(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2, heads: int = 4, head_dim=64):
    """A small FLUX.1-dev-like pipeline (guidance embedding, no CFG batch): hidden 256, 32x32 latents at 64 px."""
    from trl_diffusion_opd.testing import get_tiny_flux_pipeline

    return get_tiny_flux_pipeline(
        seed=seed,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
    )


def save_teachers(pipe, folder: Path, tasks: list[str], rank: int = 8, std: float = 0.3) -> dict[str, str]:
    """One toy LoRA teacher per task (seeded by its index), saved under `folder`. Returns `{task: path}`."""
    from trl_diffusion_opd.testing import save_toy_lora

    teachers = {}
    for index, task in enumerate(tasks):
        path = Path(folder) / f"teacher_{task}"
        save_toy_lora(pipe, path, seed=100 + index, rank=rank, std=std)
        teachers[task] = str(path)
    return teachers


def make_trainer(
    pipe, teachers: dict[str, str], output_dir: str, peft_config=None, eval_prompts=None, train_prompts=None, **config
):
    """A `DiffusionOPDTrainer` with quiet, benchmark-friendly defaults (no saving, no logging, no EMA). Prompts default
    to `TASK_PROMPTS` / `HELD_OUT_PROMPTS` of the teachers' tasks."""
    from transformers.trainer_callback import PrinterCallback

    from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer

    defaults = {
        "output_dir": output_dir,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10_000,
        "disable_tqdm": True,
        "ema": False,
        "max_sequence_length": 1,
        "seed": 0,
    }
    defaults.update(config)
    args = DiffusionOPDConfig(**defaults)
    tasks = list(teachers)
    prompts = train_prompts if train_prompts is not None else {task: TASK_PROMPTS[task] for task in tasks}
    evals = eval_prompts if eval_prompts is not None else {task: HELD_OUT_PROMPTS[task] for task in tasks}
    trainer = DiffusionOPDTrainer(
        pipe, teachers, args=args, train_dataset=prompts, eval_dataset=evals, peft_config=peft_config
    )
    trainer.remove_callback(PrinterCallback)  # no printed logs
    return trainer
