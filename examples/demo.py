"""`make demo`: the main training job on the embedded tiny default, offline on a CPU in well under a minute.

Runs `examples/configs/tiny.yaml` (a random tiny SD3 pipeline and two toy LoRA teachers, see that file) and prints the
KL between the student and each task's teacher on held-out prompts before and after training, so that the
distillation is visible. Any `trl-diffusion-opd train` flag overrides the config:

    python examples/demo.py --output_dir demo_output --max_steps 40
"""

import sys
from pathlib import Path

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
        print(f"  {task:<8} {before[task]:.6f} -> {after[task]:.6f}  ({after[task] / before[task] - 1:+.0%})")
    print(f"Student adapter and model card: {training_args.output_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
