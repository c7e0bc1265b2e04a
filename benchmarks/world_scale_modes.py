"""The round and query options on the world's three teachers: the paper's DiffusionOPD row ("ODE (closed form)")
against mixed-task rounds, single-query supervision, a base anchor and a CFG-absorbed student, with
`benchmarks.world_ablation`'s training, evaluation and per-run cache (`--cache_dir`). Rewards and KL are measured on
held-out scenes as in that table; the cost column is the training CPU seconds of all rounds.

    python -m benchmarks.world_scale_modes [--seeds 0 1] [--rounds 30] [--every 10] [--eval_images 16]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from .common import RESULTS_DIR, write_results
from .world_ablation import AblationSettings, run


METHODS = [
    "ODE (closed form)",
    "mixed-task rounds (3 tasks x 2 rows)",
    "mixed-task rounds (1 task x 2 rows)",
    "single query",
    "anchor: base, weight 0.1",
    "CFG-absorbed (teachers at CFG 2)",
    "mixed-task rounds, 30 teachers (3 of 30 x 2 rows)",
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--eval_images", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cache_dir", default=str(RESULTS_DIR / "world_ablation_runs"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--cached_only", action="store_true", help="Summarise the finished runs in --cache_dir only (run nothing)."
    )
    args = parser.parse_args(argv)
    settings = AblationSettings(rounds=args.rounds, every=args.every, eval_images=args.eval_images)
    out = run(
        settings,
        workers=args.workers,
        write=False,
        folder=args.cache_dir,
        methods=args.methods,
        seeds=tuple(args.seeds),
        cached_only=args.cached_only,
    )
    if not args.no_write:
        write_results(
            "world_scale_modes",
            "Round and query options on the world's teachers (benchmarks.world_scale_modes)",
            {**asdict(settings), "seeds": args.seeds, "methods": args.methods},
            {"rows": out["rows"], "results": out["results"]},
            out["markdown"] + "\n",
        )
    print(out["markdown"])
    return out


if __name__ == "__main__":
    main()
