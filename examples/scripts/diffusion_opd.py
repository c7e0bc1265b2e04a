"""DiffusionOPD: distil reward-specific LoRA teachers into one LoRA student, TRL-style.

Usage (the same arguments as `trl-diffusion-opd train`; flags override the YAML):

    # the embedded tiny default, offline on a CPU
    python examples/scripts/diffusion_opd.py --config examples/configs/tiny.yaml

    # the paper's recipe on 8 GPUs
    accelerate launch --num_processes 8 examples/scripts/diffusion_opd.py \
        --config examples/configs/sd35m_three_teachers.yaml

    # torchrun works too: the Trainer reads the process group from the environment
    torchrun --nproc_per_node 8 examples/scripts/diffusion_opd.py --config examples/configs/sd35m_three_teachers.yaml

Teachers are `{task: spec}` with spec a local folder, `owner/repo`, `owner/repo/sub/folder` or
`owner/repo[/sub/folder]@revision` (or a dict with `path`, `subfolder`, `revision`, `guidance_scale`, `weight`);
prompts are `{task: source}` with a `.txt` (one prompt per line), a `.jsonl` (a `prompt` field plus metadata), a data
file, a local dataset or a Hub dataset id, or one `dataset_name` with `prompt` and `task` columns.
"""

from trl_diffusion_opd import DiffusionModelConfig, DiffusionOPDConfig
from trl_diffusion_opd.scripts.train import DiffusionOPDScriptArguments, build_trainer, make_parser


def main(
    script_args: DiffusionOPDScriptArguments, training_args: DiffusionOPDConfig, model_args: DiffusionModelConfig
):
    # Base pipeline, teachers (resolved from the Hub once), prompts per task and the student LoRA.
    trainer = build_trainer(script_args, training_args, model_args)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # `pytorch_lora_weights.safetensors` (EMA weights when EMA is on) and README.md, the model card.
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Student adapter saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):  # transformers >= 5.18: close trackers and the process group
        trainer.end()


if __name__ == "__main__":
    parser = make_parser(prog="diffusion_opd.py")
    # Keys meant for `accelerate launch` (e.g. `num_processes`) may sit in the YAML; they are not this script's.
    script_args, training_args, model_args = parser.parse_args_and_config(fail_with_unknown_args=False)[:3]
    main(script_args, training_args, model_args)
