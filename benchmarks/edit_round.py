"""The cost of an editing round against a text-to-image round at the same output size, conditioning cache on and off.

One DiffusionOPD task on a FLUX.1 Kontext pipeline, trained with `DiffusionOPDTrainer.train()`: its rows either
carry a reference image (editing: the reference's tokens join every student and teacher pass) or none
(text-to-image), at the same output size. With the conditioning cache on (the default), a row's prompt and
reference latents are encoded once; off (the trainer's `PromptCache` keeping nothing), every call encodes them again (text encoders and
the VAE). Each optimizer step (a whole round) is clocked from `on_step_begin` to `on_step_end`; the median over the
timed rounds is reported, after one warm-up round.

    python -m benchmarks.edit_round               # CPU preset: a small Kontext at 64 px (256 + 256 tokens)
    python -m benchmarks.edit_round --quick --no-write
    python -m benchmarks.edit_round --resolution 512 --layers 4 --single-layers 8    # on a GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .common import markdown_table, median, save_teachers, setup, small_flux_pipeline, write_results


PROMPTS = ["make it red", "add a hat", "turn it to night", "as a sketch"]


class _RoundClock(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def round_seconds(edit: bool, cache: bool, resolution: int, rounds: int, steps: int, pipe_kwargs: dict) -> float:
    """Median seconds of a round (after one warm-up round) of one task with 2 rows per round."""
    from diffusers import FluxKontextPipeline

    from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
    from trl_diffusion_opd.testing import get_tiny_input_image

    pipe = FluxKontextPipeline(**small_flux_pipeline(**pipe_kwargs).components)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        teachers = save_teachers(pipe, Path(tmp), ["edit"])
        rows = [
            {"prompt": p, "image": get_tiny_input_image(i, resolution, resolution)} if edit else {"prompt": p}
            for i, p in enumerate(PROMPTS)
        ]
        args = DiffusionOPDConfig(
            output_dir=str(Path(tmp) / "out"),
            max_steps=rounds + 1,
            per_device_train_batch_size=2,
            resolution=resolution,
            num_inference_steps=steps,
            guidance_scale=2.5,
            max_sequence_length=32,
            ema=False,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=1000,
            offload_text_encoders=False,  # the same text-encoder placement with the cache on and off
            family_kwargs={"auto_resize": False},  # the reference at the output's size, not snapped to ~1 MP
        )
        clock = _RoundClock()
        trainer = DiffusionOPDTrainer(pipe, teachers, args=args, train_dataset={"edit": rows}, callbacks=[clock])
        if not cache:  # nothing kept: every call encodes its rows again (the config's smallest cache keeps one)
            trainer.prompt_cache.max_size = 0
        trainer.train()
    return median(clock.times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A tiny configuration (smoke check).")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--single-layers", type=int, default=2)
    ns = parser.parse_args(argv)
    threads = setup()
    resolution, rounds, steps = (32, 2, 3) if ns.quick else (ns.resolution, ns.rounds, ns.steps)
    pipe_kwargs = {"num_layers": ns.layers, "num_single_layers": ns.single_layers}
    if ns.quick:
        pipe_kwargs.update(heads=2, head_dim=16)
    results = {}
    for edit in (False, True):
        for cache in (True, False):
            key = f"{'edit' if edit else 't2i'}-cache-{'on' if cache else 'off'}"
            results[key] = round_seconds(edit, cache, resolution, rounds, steps, pipe_kwargs)
            print(f"[edit_round] {key}: {results[key]:.3f} s per round", flush=True)
    base = results["t2i-cache-on"]
    rows = [
        [kind, cache, f"{results[f'{kind}-cache-{cache}']:.3f}", f"{results[f'{kind}-cache-{cache}'] / base:.2f}"]
        for kind in ("t2i", "edit")
        for cache in ("on", "off")
    ]
    table = markdown_table(["rows", "conditioning cache", "s / round (median)", "x t2i, cache on"], rows)
    print(table)
    if not ns.no_write:
        config = {"resolution": resolution, "rounds": rounds, "steps": steps, "threads": threads, **pipe_kwargs}
        write_results(
            "edit_round",
            "Editing round vs text-to-image round (FLUX.1 Kontext, same output size), conditioning cache on / off",
            config,
            {"seconds_per_round": results},
            table,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
