"""`trl-diffusion-opd world ...`: pretrain and evaluate the world pipeline, train its Stage-1 teachers.

```bash
trl-diffusion-opd world pretrain --output_dir world-base --steps 20000 --batch_size 256 --device cuda \
    --mixed_precision bf16 --num_workers 8 --max_minutes 60
trl-diffusion-opd world eval --model world-base/pipeline --num_images 256
trl-diffusion-opd world teachers --tasks composition letters aesthetic --output_dir world-teachers --num_images 256
```

`world_command(argv)` is the entry point; the main console script forwards `world ...` to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .pipeline import WorldModelConfig


def _parser() -> argparse.ArgumentParser:
    from .pretrain import PretrainConfig

    # No abbreviated options (`--num_image` is an error, not `--num_images`), as in the package's commands.
    parser = argparse.ArgumentParser(
        prog="trl-diffusion-opd world", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser(
        "pretrain",
        allow_abbrev=False,
        help="Rectified-flow pretraining of the world pipeline (resumes from OUTPUT_DIR/checkpoint when present).",
    )
    defaults = PretrainConfig()
    for f in dataclasses.fields(PretrainConfig):
        if f.name in ("model", "progress"):
            continue
        default = getattr(defaults, f.name)
        kind = float if f.name == "max_minutes" else type(default)
        pre.add_argument(f"--{f.name}", type=kind, default=default, help=f"(default: {default})")
    pre.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    model_defaults = WorldModelConfig()
    for f in dataclasses.fields(WorldModelConfig):
        default = getattr(model_defaults, f.name)
        name = "model_seed" if f.name == "seed" else f.name  # --seed is the data / noise seed
        pre.add_argument(
            f"--{name}", type=type(default), default=default, help=f"Model (new runs only; default: {default})"
        )

    ev = sub.add_parser("eval", help="Score a world pipeline on every task; prints JSON.", allow_abbrev=False)
    ev.add_argument("--model", default=None, help="Pipeline folder (default: the shipped base).")
    ev.add_argument("--num_images", type=int, default=128, help="Images per task.")
    ev.add_argument("--num_inference_steps", type=int, default=10)
    ev.add_argument("--guidance_scale", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--output", default=None, help="Also write the JSON to this file.")

    te = sub.add_parser(
        "teachers",
        allow_abbrev=False,
        help="Train the Stage-1 LoRA teachers on the shipped base with their recipes, then score base vs teacher.",
    )
    tasks = ["composition", "letters", "aesthetic"]
    te.add_argument("--tasks", nargs="+", default=tasks, choices=tasks, help="Tasks to train.")
    te.add_argument("--output_dir", required=True, help="One sub-folder per task; index.json is written last.")
    te.add_argument("--max_steps", type=int, default=None, help="Optimizer steps (default: each recipe's).")
    te.add_argument("--seed", type=int, default=0, help="Adapter initialisation and rollout seed.")
    te.add_argument("--num_images", type=int, default=256, help="Held-out images per task for the scores.")
    te.add_argument("--eval_seed", type=int, default=None, help="Held-out prompts and noise (default: EVAL_SEED).")
    te.add_argument("--skip_training", action="store_true", help="Only score the adapters already in OUTPUT_DIR.")
    te.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")
    return parser


def world_command(argv: list[str]) -> int:
    """Run `world pretrain`, `world eval` or `world teachers` with command-line arguments `argv` (without `world`); returns the exit
    status."""
    args = _parser().parse_args(argv)
    if args.command == "pretrain":
        from .pretrain import PretrainConfig, pretrain

        values = vars(args)
        model = WorldModelConfig(
            **{
                f.name: values["model_seed" if f.name == "seed" else f.name]
                for f in dataclasses.fields(WorldModelConfig)
            }
        )
        kwargs = {f.name: values[f.name] for f in dataclasses.fields(PretrainConfig) if f.name in values}
        kwargs.pop("model", None)
        config = PretrainConfig(**kwargs, model=model, progress=not args.no_progress)
        folder = pretrain(config)
        print(f"Saved the world pipeline to {folder}")
        scores = folder / "world_scores.json"
        if scores.is_file():
            print(scores.read_text())
        return 0
    if args.command == "teachers":
        from .teachers import EVAL_SEED, train_and_score_teachers

        index = train_and_score_teachers(
            args.tasks,
            args.output_dir,
            max_steps=args.max_steps,
            seed=args.seed,
            num_images=args.num_images,
            eval_seed=EVAL_SEED if args.eval_seed is None else args.eval_seed,
            train=not args.skip_training,
            progress=not args.no_progress,
        )
        print(json.dumps(index, indent=2))
        return 0
    from .pipeline import load_world_pipeline
    from .pretrain import evaluate_world

    pipe = load_world_pipeline(args.model, device=args.device)
    scores = evaluate_world(pipe, args.num_images, args.num_inference_steps, args.guidance_scale, args.seed)
    text = json.dumps(scores, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(world_command(sys.argv[1:]))
