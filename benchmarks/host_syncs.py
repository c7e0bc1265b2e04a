"""Host synchronisations of a DiffusionOPD round, counted on any device.

On a GPU every `.item()`, `.tolist()`, `bool(tensor)`, `nonzero()`, `.cpu()` of a device tensor stalls the host
until the queue drains, which exposes the Python time of the next step (`benchmarks/gpu_round.py` counts them with
`torch.cuda.set_sync_debug_mode`). Those calls can be counted on a CPU too: `count_host_syncs` patches the tensor
methods that read a value back and records each call's source line. On a CPU the count includes calls on tensors
that live on the host even on a GPU (the sigma schedule, routing weights), which cost nothing there, and it cannot
see host-to-device copies (`.to(device)` of a CPU tensor), which do synchronise on a GPU; the table says which lines
are which.

    python -m benchmarks.host_syncs            # tiny SD3, seconds; writes results/host_syncs.json + RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch


# Tensor methods that return a value to Python (and so wait for the device).
READ_BACKS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy")
_ROOT = Path(__file__).resolve().parent.parent
_TORCH = str(Path(torch.__file__).parent)


def _caller() -> str:
    """`path:line (function)` of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = Path(frame.f_code.co_filename)
    try:
        path = path.resolve().relative_to(_ROOT)
    except ValueError:
        path = Path(*path.parts[-3:])
    owner = frame  # a comprehension is reported under the function it is written in
    while owner.f_code.co_name.startswith("<") and owner.f_code.co_name != "<module>" and owner.f_back is not None:
        owner = owner.f_back
    return f"{path}:{frame.f_lineno} ({owner.f_code.co_name})"


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """Count the read-backs (`READ_BACKS`, and `torch.nonzero`) made inside the block.

    Yields:
        A `Counter` `{"path:line (function) method": calls}`, filled as the block runs; `counter.active` toggles
        counting.
    """
    counts: Counter = Counter()
    counts.active = True
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}
    original_nonzero = torch.nonzero

    def counted(name, function):
        def wrapper(*args, **kwargs):
            if counts.active:
                counts[f"{_caller()} {name}"] += 1
            return function(*args, **kwargs)

        return wrapper

    for name, function in originals.items():
        setattr(torch.Tensor, name, counted(name, function))
    torch.nonzero = counted("nonzero", original_nonzero)
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(torch.Tensor, name, function)
        torch.nonzero = original_nonzero


def count_round(trainer, rounds: int = 2) -> Counter:
    """Read-backs per round of `trainer.train()` (optimizer step and logging every round included), averaged over
    `rounds` rounds after one warm-up round. The trainer should have `max_steps = rounds + 1`, `logging_steps = 1`."""
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            counts.active = state.global_step >= 1

    with count_host_syncs() as counts:
        counts.active = False
        trainer.add_callback(Window())
        trainer.train()
    return Counter({key: value / rounds for key, value in counts.items()})


def run(preset: str = "tiny", rounds: int = 2) -> dict:
    """Read-backs per round for the fused and two-pass rounds, `step_batch_size` None and 1."""
    import shutil

    from peft import LoraConfig

    from .released_loop import PRESETS, STUDENT_TARGETS, build, preset_trainer

    settings = PRESETS[preset]
    results = {}
    for fused in (True, False):
        for step_batch_size in (None, 1):
            pipe, teachers, folder = build(preset, torch.device("cpu"), torch.float32)
            try:
                trainer = preset_trainer(
                    preset,
                    pipe,
                    teachers,
                    folder,
                    LoraConfig(r=8, lora_alpha=16, target_modules=STUDENT_TARGETS),
                    step_batch_size=step_batch_size,
                    fused_rollout=fused,
                    max_steps=rounds + 1,
                    logging_steps=1,
                )
                counts = count_round(trainer, rounds)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            name = f"{'fused' if fused else 'two-pass'}, step_batch_size={step_batch_size}"
            results[name] = {"total": sum(counts.values()), "by_line": dict(counts.most_common())}
    return {"preset": preset, "settings": settings, "rounds": rounds, "cases": results}


def markdown(data: dict, before: dict | None = None) -> str:
    from .common import markdown_table

    settings = data["settings"]
    rows = []
    for name, case in data["cases"].items():
        lines = ", ".join(f"`{line}` x{count:g}" for line, count in list(case["by_line"].items())[:8])
        earlier = before["cases"].get(name, {}).get("total") if before else None
        rows.append([name, "-" if earlier is None else f"{earlier:g}", f"{case['total']:g}", lines or "-"])
    return (
        f"Read-backs to the host (`{'`, `'.join(READ_BACKS)}`, `torch.nonzero`) per round of `trainer.train()`, "
        f"counted by patching the tensor methods (`benchmarks/host_syncs.py`), mean over {data['rounds']} rounds after "
        f"a warm-up round, logging every round: 3 tasks x {settings['prompts_per_task']} prompts, N = "
        f"{settings['steps']}, CFG 4.5, one LoRA teacher per task (the `{data['preset']}` preset of "
        "`benchmarks/released_loop.py`). On a GPU each of these on a device tensor is a host synchronisation; "
        "host-to-device copies (not visible on a CPU) are not counted.\n\n"
        + markdown_table(
            [
                "round",
                f"read-backs / round before ({before.get('label', '-') if before else '-'})",
                "read-backs / round",
                "where (most frequent)",
            ],
            rows,
        )
    )


def main(argv=None) -> dict:
    from .common import setup, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--before", default=None, help="JSON of an earlier `run()` to show beside (with a 'label').")
    ns = parser.parse_args(argv)
    setup()
    os.environ.setdefault("TQDM_DISABLE", "1")
    data = run(ns.preset, ns.rounds)
    for name, case in data["cases"].items():
        print(f"[host_syncs] {name}: {case['total']:g} read-backs per round", flush=True)
    if not ns.no_write:
        title = "Host read-backs of a round"
        config = {"preset": ns.preset, "rounds": ns.rounds}
        before = json.loads(Path(ns.before).read_text()) if ns.before else None
        write_results("host_syncs", title, config, data, markdown(data, before))
    return data


if __name__ == "__main__":
    main()
