from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora


# Offline, on a CPU: the tiny SD3-structured base `tiny:sd3` and random LoRA teachers `toy:<seed>`, the names that
# examples/configs/tiny.yaml gives the command line (toy teachers are written to output_dir/_toy_teachers).
args = DiffusionOPDConfig(
    output_dir="tiny-diffusion-opd",
    resolution=32,
    num_inference_steps=4,
    max_sequence_length=32,
    per_device_train_batch_size=2,
    learning_rate=5e-3,
    ema=False,
    max_steps=60,
    report_to="none",
)
prompts = {
    "shapes": ["a red circle", "a blue square", "a green triangle", "a yellow star"],
    "text": ['a sign that says "open"', 'the word "cat" in bold', 'a mug that says "hi"'],
}
trainer = DiffusionOPDTrainer(
    "tiny:sd3", teachers={"shapes": "toy:1", "text": "toy:2"}, args=args, train_dataset=prompts
)
trainer.train()
trainer.save_model()  # tiny-diffusion-opd/pytorch_lora_weights.safetensors + README.md

# The same with objects: the builder behind `tiny:sd3`, and toy LoRA teachers saved where you like.
pipe = get_tiny_sd3_pipeline(seed=0)
teachers = {task: str(save_toy_lora(pipe, f"teachers/{task}", seed=seed)) for seed, task in enumerate(prompts, 1)}
trainer_from_objects = DiffusionOPDTrainer(pipe, teachers=teachers, args=args, train_dataset=prompts)
