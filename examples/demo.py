"""`make demo`: the main training job on the embedded tiny default, offline on a CPU in about a minute.

Runs `examples/configs/tiny.yaml` (a random tiny SD3 pipeline and two toy LoRA teachers, see that file) and prints the
KL between the student and each task's teacher on held-out prompts before and after training, so that the
distillation is visible. Any `trl-diffusion-opd train` flag overrides the config:

    python examples/demo.py --output_dir demo_output --max_steps 40
"""

import sys
from pathlib import Path

from diffusers.utils import make_image_grid

from trl_diffusion_opd.cli import build_trainer, make_parser


CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def main(argv: list[str]) -> None:
    parser = make_parser(prog="demo.py")
    script_args, training_args, model_args = parser.parse_args_and_config(["--config", str(CONFIG), *argv])
    trainer = build_trainer(script_args, training_args, model_args)
    before = trainer.compute_teacher_kl()
    trainer.train()
    after = trainer.compute_teacher_kl()
    trainer.save_model(training_args.output_dir)

    print(f"\nKL(student || teacher) on held-out prompts, {trainer.state.global_step} rounds:")
    for task in before:
        print(f"  {task:<8} {before[task]:.3e} -> {after[task]:.3e}  ({after[task] / before[task] - 1:+.0%})")
    grid = sample_grid(trainer)
    print(f"Student adapter and model card: {training_args.output_dir}")
    print(f"Samples (rows: base, teachers, student; columns: held-out prompts): {grid}")
    print("\nLoad the student in diffusers:")
    print("    pipe = <the base pipeline>  # here: trl_diffusion_opd.testing.get_tiny_sd3_pipeline()")
    print(f"    pipe.load_lora_weights({str(training_args.output_dir)!r})")


def sample_grid(trainer) -> Path:
    """One row of images per model (base, each teacher, the student) on the held-out prompts, same noise."""
    prompts = [row["prompt"] for rows in trainer.eval_prompts.values() for row in rows]
    rows = [("base", None)] + [(spec.name, spec.name) for specs in trainer.teacher_specs.values() for spec in specs]
    rows.append(("student", "student"))
    images = [image for _, adapter in rows for image in trainer.generate(prompts, adapter=adapter)]
    grid = make_image_grid([image.resize((96, 96), 0) for image in images], rows=len(rows), cols=len(prompts))
    path = Path(trainer.args.output_dir) / "samples" / "grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
