"""`make demo`: the paper's two-stage recipe on the tiny world, offline on a CPU in a few minutes.

Loads the shipped world base (a 3.5M-parameter SD3 pretrained on synthetic 32x32 scenes) and the three shipped Stage-1
teachers (composition, letters and aesthetic LoRAs trained with the package's RL trainers), distils them into one
LoRA student with DiffusionOPD, then samples every model on held-out scenes and prints the paper-style table (rows:
base, teachers, student; columns: the three rule-based rewards and their average). Everything lands in
`--output_dir`: the student adapter and model card, `comparison.png` (every model on the same held-out prompts, with
the table), `results.md` / `results.json`, `grids/<model>.png` and `demo.json` (settings, timings, training log).

    python examples/demo.py --output_dir demo_output        # quick: 30 rounds, 32 held-out scenes per task
    python examples/demo.py --full                          # the full-size table (docs/world.md): 60 rounds
    python examples/demo.py --multitask_baseline            # adds the paper's multi-task RL row (~10 more minutes)
    python examples/demo.py --retrain_teachers              # re-trains the teachers first (Stage 1, ~15 minutes)
"""

import argparse
import time

from trl_diffusion_opd.scripts import quiet_library_logs


def main() -> None:
    quiet_library_logs()  # first: torch, diffusers and transformers print their import-time notes as they load
    import torch

    from trl_diffusion_opd.world.demo import DemoConfig, run_demo

    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--output_dir", default=defaults.output_dir)
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="DiffusionOPD rounds (optimizer steps).")
    parser.add_argument("--prompts_per_task", type=int, default=defaults.prompts_per_task)
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--eval_images", type=int, default=defaults.eval_images, help="Held-out images per task.")
    parser.add_argument("--figure_prompts", type=int, default=defaults.figure_prompts, help="Prompts per task shown.")
    parser.add_argument(
        "--full", action="store_true", help="The full-size table: 60 rounds of 4 prompts, 96 scenes per task."
    )
    parser.add_argument(
        "--retrain_teachers", action="store_true", help="Re-train the teachers and a multi-task RL baseline first."
    )
    parser.add_argument(
        "--multitask_baseline", action="store_true", help="Add a multi-task RL row (the shipped teachers are kept)."
    )
    parser.add_argument("--teacher_steps", type=int, default=None, help="Steps per re-trained teacher/baseline.")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num_threads", type=int, default=None, help="Torch threads (default: torch's).")
    ns = parser.parse_args()
    config = DemoConfig(**vars(ns))
    start = time.perf_counter()
    result = run_demo(config)
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\nDiffusionOPD on the tiny world: {config.rounds} rounds, {config.eval_images} held-out scenes per task, "
        f"{torch.get_num_threads()} threads, {minutes:.1f} min\n"
    )
    print(result.to_markdown())
    print(f"Comparison figure (models x held-out prompts, and the table): {config.output_dir}/comparison.png")
    print(f"Student adapter and model card: {config.output_dir}/student")
    print(f"Table: {config.output_dir}/results.md; image grids (one per model): {config.output_dir}/grids/")
    print("\nLoad the student in diffusers:")
    print("    from trl_diffusion_opd.world.pipeline import load_world_pipeline")
    print("    pipe = load_world_pipeline()")
    print(f"    pipe.load_lora_weights({config.output_dir + '/student'!r})")
    print('    image = pipe("a red circle on the left", height=32, width=32, max_sequence_length=1).images[0]')


if __name__ == "__main__":
    main()
