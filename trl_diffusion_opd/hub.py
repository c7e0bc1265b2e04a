"""The Hub side of a trained adapter: its model card (rendered from the package's Jinja template with
`huggingface_hub.ModelCard`) and the uploads of the trainers' `push_to_hub` (`DiffusionLoRATrainer`,
`FlowGRPOTrainer`, `DiffusionNFTTrainer`: every `DiffusionLoRATrainer`).

What goes to the Hub is an allow-list, never a whole folder: the student adapter
(`pytorch_lora_weights.safetensors`), the model card (`README.md`) and sample images (`samples/*.png`). The base
model, the teachers, the training arguments and the optimizer state stay local, unless `hub_strategy` is
`"checkpoint"` or `"all_checkpoints"`, which asks for resumable checkpoints on the Hub.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from .teachers import expert_weight_name


if TYPE_CHECKING:
    from .teachers import TeacherSpec

# The trainers call this module (it never imports them): `trainer` arguments are `DiffusionLoRATrainer`s.
DiffusionLoRATrainer = Any

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
CARD_NAME = "README.md"
SAMPLES_DIR = "samples"
# Files of `output_dir` that `push_to_hub` uploads; everything else stays local.
# The LoRAs of a multi-expert student's further experts (Wan 2.2: `pytorch_lora_weights_transformer_2.safetensors`).
EXPERT_WEIGHTS = "pytorch_lora_weights_*.safetensors"
UPLOAD_PATTERNS = [ADAPTER_WEIGHTS, EXPERT_WEIGHTS, CARD_NAME, f"{SAMPLES_DIR}/*.png"]

TRL_CITATION = """@software{vonwerra2020trl,
    title   = {{TRL: Transformers Reinforcement Learning}},
    author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
    license = {Apache-2.0},
    url     = {https://github.com/huggingface/trl},
    year    = {2020}
}"""


def _license(name: str, license_name: str | None = None, base: str | None = None) -> dict[str, str]:
    data = {"license": name}
    if license_name:
        data["license_name"] = license_name
        data["license_link"] = f"https://huggingface.co/{base}/blob/main/LICENSE.md"
    return data


# Licenses of well-known bases, used before (and instead of) reading the base's own card, which may be offline.
# An adapter inherits its base's terms, so the card links to the base's licence file.
KNOWN_LICENSES = {
    base: _license("other", "stabilityai-ai-community", base)
    for base in (
        "stabilityai/stable-diffusion-3.5-medium",
        "stabilityai/stable-diffusion-3.5-large",
        "stabilityai/stable-diffusion-3.5-large-turbo",
        "stabilityai/stable-diffusion-3-medium-diffusers",
    )
}
KNOWN_LICENSES["black-forest-labs/FLUX.1-dev"] = _license(
    "other", "flux-1-dev-non-commercial-license", "black-forest-labs/FLUX.1-dev"
)
KNOWN_LICENSES["black-forest-labs/FLUX.1-schnell"] = _license("apache-2.0")

PACKAGES = (
    "trl-diffusion-opd",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "torch",
    "datasets",
    "bitsandbytes",
    "huggingface_hub",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that matter for reproducing a run (`"not installed"` when missing)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def is_hub_id(name: str | os.PathLike | None) -> bool:
    """Whether `name` reads as a Hub repo id (`owner/name`) rather than a local path."""
    if isinstance(name, os.PathLike):
        return False
    return bool(name) and _HUB_ID.match(name) is not None and not os.path.exists(name)


@functools.lru_cache(maxsize=32)
def base_license(base: str | None) -> dict[str, str]:
    """Licence metadata (`license`, and `license_name` / `license_link` for custom licences) of a base model.

    Well-known bases come from `KNOWN_LICENSES`; others from the base's own model card (a local `README.md`, or the
    Hub's, which honours `HF_HUB_OFFLINE`). Empty when unknown.
    """
    if not base:
        return {}
    if base in KNOWN_LICENSES:
        return dict(KNOWN_LICENSES[base])
    try:
        local = Path(base) / CARD_NAME
        card = ModelCard.load(local if local.is_file() else base, ignore_metadata_errors=True)
    except Exception:  # an unreachable or card-less base simply has no known licence
        return {}
    data = card.data.to_dict()
    result = {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}
    link = result.get("license_link")
    if link and "://" not in link and is_hub_id(base):
        result["license_link"] = f"https://huggingface.co/{base}/blob/main/{link}"
    return result if "license" in result else {}


def teacher_source(spec: TeacherSpec) -> str:
    """`id[/sub/folder]@revision` of a teacher; the revision is the resolved commit when none was asked for."""
    if spec.revision or spec.local_dir is None or spec.is_local:
        return spec.display
    parts = Path(spec.local_dir).parts
    if "snapshots" in parts:
        index = parts.index("snapshots")
        if index + 1 < len(parts) and _COMMIT.match(parts[index + 1]):
            return f"{spec.display}@{parts[index + 1]}"
    return spec.display


def sample_widgets(trainer: DiffusionLoRATrainer) -> list[dict[str, str]]:
    """Widget entries `{"text": prompt, "url": "samples/<file>.png"}` for the card.

    `trainer.sample_widgets` wins when the trainer recorded its samples with their prompts; otherwise every
    `output_dir/samples/*.png` is listed, its file name standing in for the prompt.
    """
    recorded = getattr(trainer, "sample_widgets", None)
    if recorded:
        return [{"text": str(item["text"]), "url": str(item["url"])} for item in recorded]
    folder = Path(trainer.args.output_dir) / SAMPLES_DIR
    if not folder.is_dir():
        return []
    return [
        {"text": path.stem.replace("_", " "), "url": f"{SAMPLES_DIR}/{path.name}"}
        for path in sorted(folder.glob("*.png"))
    ]


def _example_prompt(trainer: DiffusionLoRATrainer) -> str:
    """A prompt of the training data for the card's quick start (what the adapter was trained on)."""
    for rows in (getattr(trainer, "task_prompts", None) or {}).values():
        for row in rows:
            return str(row["prompt"])
    return 'A photo of a cat holding a sign that says "hello"'


def create_model_card(
    trainer: DiffusionLoRATrainer,
    model_name: str | None = None,
    dataset_name: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    samples: list[dict] | None = None,
) -> ModelCard:
    """Render the model card of `trainer`'s student adapter.

    What is specific to the algorithm comes from `trainer._model_card_details()`: the summary sentence (which
    algorithm, which teachers or rewards), the teachers' and rewards' tables, extra tags (tasks, reward names), the
    algorithm's rows of the training table and the papers to cite (`trainer._name`, `trainer._paper`).

    Args:
        trainer: The trainer whose config, base and algorithm describe the adapter.
        model_name: Title of the card; defaults to the last part of `hub_model_id` or of `output_dir`.
        dataset_name: Hub dataset id(s) of the prompts, recorded in the metadata.
        tags: Extra tags.
        samples: Widget entries `{"text": prompt, "url": path in the repo}`; defaults to `sample_widgets(trainer)`.
    """
    args = trainer.args
    base = trainer.base_model_id
    base_on_hub = is_hub_id(base)
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id or Path(args.output_dir).name
    details = trainer._model_card_details()
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    all_tags = list(dict.fromkeys([*trainer._tag_names, trainer.family.tag, *details.get("tags", []), *extra_tags]))
    datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    samples = samples if samples is not None else sample_widgets(trainer)
    card_data = ModelCardData(
        base_model=base if base_on_hub else None,
        base_model_relation="adapter" if base_on_hub else None,
        library_name="diffusers",
        pipeline_tag=trainer.family.pipeline_tag,
        tags=all_tags,
        datasets=[name for name in datasets if is_hub_id(name)] or None,
        widget=[{"text": s["text"], "output": {"url": s["url"]}} for s in samples] or None,
        **(base_license(base) if base_on_hub else {}),
    )
    peft_config = trainer.peft_config
    targets = peft_config.target_modules or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    sampler = "ODE (deterministic)" if args.noise_level == 0 else f"{args.sde_type.upper()} (stochastic)"
    settings = {
        "algorithm": trainer._name,
        "sampler": sampler,
        "sampler steps (trained steps)": f"{args.num_inference_steps} ({args.num_train_timesteps})",
        "noise level": args.noise_level,
        "student CFG scale": args.guidance_scale,
        "resolution": f"{args.resolution} px",
        **details.get("settings", {}),
        "LoRA rank / alpha": f"{peft_config.r} / {peft_config.lora_alpha}",
        "LoRA targets": ", ".join(targets),
        "learning rate": args.learning_rate,
        details.get("steps_label", "optimizer steps"): trainer.state.global_step,
        "EMA": f"decay {args.ema_decay}, every {args.ema_update_interval} steps" if args.ema else "off",
        "seed": args.seed,
    }
    if args.student_adapter:
        settings["continued from"] = f"`{args.student_adapter}`"
    papers = [paper for paper in details.get("papers", [trainer._paper]) if paper]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name or repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base or "unknown",
        base_on_hub=base_on_hub,
        algorithm=trainer._name,
        summary=details.get("summary", f"trained with **{trainer._name}**."),
        papers=papers,
        trl_citation=TRL_CITATION,
        teachers=details.get("teachers", []),
        rewards=details.get("rewards", []),
        guidance_scale=args.guidance_scale,
        example_prompt=repr(_example_prompt(trainer)),
        num_inference_steps=args.num_inference_steps,
        resolution=args.resolution,
        max_sequence_length=args.max_sequence_length,
        extra_experts=[
            {"component": name, "weight_name": expert_weight_name(name)} for name in list(trainer.family.experts)[1:]
        ],
        video=trainer.family.pipeline_tag == "text-to-video",
        num_frames=trainer.family.num_frames,
        guidance_scale_2=args.guidance_scale_2,
        settings=settings,
        samples=samples,
        versions=package_versions(),
    )


def _hf_api():
    # The Trainer's shared client, so that uploads carry transformers' library info like the Trainer's own.
    from transformers.utils.hub import hf_api

    return hf_api()


def push_to_hub(
    trainer: DiffusionLoRATrainer,
    commit_message: str | None = "End of training",
    blocking: bool = True,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    **card_kwargs: Any,
):
    """Save the student adapter and its card into `output_dir`, then upload the allow-listed files to
    `trainer.hub_model_id` (created from `hub_model_id` / `output_dir` and `hub_private_repo` when needed).

    Args:
        trainer: The trainer.
        commit_message: Message of the commit.
        blocking: Wait for the upload; `False` returns a `Future`.
        token: Token with write access; defaults to `args.hub_token`.
        revision: Branch to push to; defaults to `args.hub_revision`.
        private: Visibility of a newly created repo; defaults to `args.hub_private_repo`.
        card_kwargs: `model_name`, `dataset_name`, `tags` for the card.

    Returns:
        The `CommitInfo` of the upload (a `Future` when `blocking=False`); `None` on processes other than the first.
    """
    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    token = token if token is not None else args.hub_token
    if trainer.hub_model_id is None:
        trainer.init_hf_repo(token=token, private=private)
    trainer.save_model(_internal_call=True)  # every process: saving may need collective operations
    if not trainer.is_world_process_zero():
        return None
    trainer.create_model_card(**card_kwargs)
    trainer._finish_current_push()
    return _hf_api().upload_folder(
        repo_id=trainer.hub_model_id,
        folder_path=args.output_dir,
        allow_patterns=UPLOAD_PATTERNS,
        commit_message=commit_message,
        token=token,
        run_as_future=not blocking,
        revision=revision if revision is not None else args.hub_revision,
    )


def push_checkpoint(trainer: DiffusionLoRATrainer, checkpoint_folder: str | os.PathLike) -> None:
    """Hub side of a checkpoint save, following `args.hub_strategy` (the body of the trainer's
    `_push_from_checkpoint`).

    `"every_save"`: the checkpoint's adapter and card are copied into `output_dir` and the allow-listed files are
    uploaded. `"checkpoint"` / `"all_checkpoints"` also upload the whole checkpoint folder (optimizer state
    included, so training can resume from the Hub) as `last-checkpoint/` or `checkpoint-N/`. `"end"` pushes nothing
    until `push_to_hub`. Uploads run in the background; a save while the previous push runs is skipped unless
    `hub_always_push`.
    """
    from transformers.trainer_utils import HubStrategy
    from transformers.utils.hub import PushInProgress

    args = trainer.args
    if not trainer.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
        return
    in_progress = getattr(trainer, "push_in_progress", None)
    if not args.hub_always_push and in_progress is not None and not in_progress.is_done():
        return
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    checkpoint_folder = Path(checkpoint_folder)
    for path in [
        checkpoint_folder / ADAPTER_WEIGHTS,
        *checkpoint_folder.glob(EXPERT_WEIGHTS),
        checkpoint_folder / CARD_NAME,
    ]:
        if path.is_file():
            shutil.copy(path, Path(args.output_dir) / path.name)
    message = f"Training in progress, step {trainer.state.global_step}"
    jobs = [
        _hf_api().upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=args.output_dir,
            allow_patterns=UPLOAD_PATTERNS,
            commit_message=message,
            token=args.hub_token,
            run_as_future=True,
            revision=args.hub_revision,
        )
    ]
    if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        path_in_repo = "last-checkpoint" if args.hub_strategy == HubStrategy.CHECKPOINT else checkpoint_folder.name
        jobs.append(
            _hf_api().upload_folder(
                repo_id=trainer.hub_model_id,
                folder_path=str(checkpoint_folder),
                path_in_repo=path_in_repo,
                commit_message=f"{message}, checkpoint",
                token=args.hub_token,
                run_as_future=True,
                revision=args.hub_revision,
            )
        )
    if in_progress is None or in_progress.is_done():
        trainer.push_in_progress = PushInProgress(jobs)
    else:
        in_progress.jobs.extend(jobs)
