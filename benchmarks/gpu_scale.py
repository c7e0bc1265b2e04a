"""Issue #20 on one GPU: the released DiffusionOPD loop vs `DiffusionOPDTrainer` at SD3.5-Medium size (random
weights, 512 px, 10 steps, 3 tasks x 3 prompts, CFG 4.5, r32 LoRAs), each in a fresh process.

    python -m benchmarks.gpu_scale            # one H100/H200; writes results/released_loop_sd35m_cuda.json + RESULTS.md
    python -m benchmarks.gpu_scale --tiny     # the same code at tiny size on whatever device there is (CPU: seconds)

The target is >= 2x the released loop's rounds/s at no more peak memory. The released loop keeps
float32 weights under fp16 autocast (as released); the trainer a bf16 base with float32 LoRA weights and gradient
checkpointing. The trainer runs with `step_batch_size=None` (all trained steps in one call) and `=1`.
"""

from __future__ import annotations

import argparse

from . import released_loop


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny size, nothing written (the CPU check).")
    parser.add_argument("--rounds", type=int, default=None)
    ns = parser.parse_args(argv)
    args = ["--preset", "tiny", "--no-write"] if ns.tiny else ["--preset", "sd35m", "--device", "cuda"]
    return released_loop.main(args + (["--rounds", str(ns.rounds)] if ns.rounds else []))


if __name__ == "__main__":
    main()
