"""The model card of a distilled adapter, rendered from the package's Jinja template with `huggingface_hub`."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData


if TYPE_CHECKING:
    from .trainer import DiffusionOPDTrainer

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
TRL_CITATION = """@software{vonwerra2020trl,
    title   = {{TRL: Transformers Reinforcement Learning}},
    author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
    license = {Apache-2.0},
    url     = {https://github.com/huggingface/trl},
    year    = {2020}
}"""
# Licenses of well-known bases, for the card's metadata when the base's own card cannot be read offline.
KNOWN_LICENSES = {
    "stabilityai/stable-diffusion-3.5-medium": "other",
    "stabilityai/stable-diffusion-3.5-large": "other",
    "stabilityai/stable-diffusion-3-medium-diffusers": "other",
    "black-forest-labs/FLUX.1-dev": "other",
    "black-forest-labs/FLUX.1-schnell": "apache-2.0",
}
PACKAGES = (
    "trl-diffusion-opd",
    "diffusers",
    "peft",
    "transformers",
    "accelerate",
    "trl",
    "torch",
    "datasets",
    "bitsandbytes",
    "huggingface_hub",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that matter for reproducing a run (`"not installed"` when missing)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def create_model_card(trainer: DiffusionOPDTrainer, samples: list[dict] | None = None) -> ModelCard:
    """Render the model card of `trainer`'s student adapter.

    Args:
        trainer: The trainer whose config, teachers and base describe the adapter.
        samples: Widget entries `{"text": prompt, "url": relative image path}` of sample images.
    """
    args = trainer.args
    base = trainer.base_model_id or "unknown"
    tasks = list(trainer.teacher_specs)
    teachers = [
        {
            "task": task,
            "source": spec.display,
            "guidance_scale": spec.guidance_scale
            if spec.guidance_scale is not None
            else args.teacher_guidance_for(task),
            "weight": spec.weight,
        }
        for task, specs in trainer.teacher_specs.items()
        for spec in specs
    ]
    family = trainer.family
    tags = list(dict.fromkeys([*trainer._tag_names, family.tag, *tasks]))
    repo_id = args.hub_model_id or Path(args.output_dir).name
    samples = samples if samples is not None else getattr(trainer, "sample_widgets", [])
    card_data = ModelCardData(
        base_model=base if base != "unknown" else None,
        base_model_relation="adapter",
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=KNOWN_LICENSES.get(base),
        tags=tags,
        widget=[{"text": s["text"], "output": {"url": s["url"]}} for s in samples] or None,
    )
    sampler = "ODE (deterministic)" if args.noise_level == 0 else f"{args.sde_type.upper()} (a = {args.noise_level})"
    settings = {
        "sampler": sampler,
        "steps (trained)": f"{args.num_inference_steps} ({args.num_train_timesteps})",
        "student guidance": args.guidance_scale,
        "resolution": args.resolution,
        "loss": "closed-form KL" if args.loss_type == "kl" else "PPO-style surrogate",
        "KL normalisation": args.kl_normalization,
        "LoRA rank / alpha": f"{trainer.peft_config.r} / {trainer.peft_config.lora_alpha}",
        "LoRA targets": ", ".join(sorted(trainer.peft_config.target_modules or [])),
        "learning rate": args.learning_rate,
        "prompts per task per device per round": args.per_device_train_batch_size,
        "rounds (optimizer steps)": trainer.state.global_step,
        "EMA": f"decay {args.ema_decay} every {args.ema_update_interval} steps" if args.ema else "off",
    }
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base,
        paper_id=trainer._paper["id"],
        paper_citation=trainer._paper["citation"],
        trl_citation=TRL_CITATION,
        tasks=tasks,
        teachers=teachers,
        guidance_scale=args.guidance_scale,
        settings=settings,
        samples=samples,
        versions=package_versions(),
    )
