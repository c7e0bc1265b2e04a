"""Stage-1 teachers of the world: one small LoRA per task, trained with the package's own RL trainers on the shipped
base, and the paired base-vs-teacher scoring that checks them.

The shipped teachers live in `TEACHERS_DIR/<task>/` (diffusers-format LoRA `pytorch_lora_weights.safetensors`,
model card `README.md`, `scores.json`); `TEACHERS_DIR/index.json` maps each task to its folder, trainer, reward and
scores. Recipes (`RECIPES`) follow the paper where it works here: DiffusionNFT for the GenEval-style composition
task and GRPO-Guard (Flow-GRPO with RatioNorm) for the OCR-style letters. The aesthetic teacher uses DiffusionNFT
instead of the paper's GRPO-Guard: SDE rollouts end noisy and all score 0 on `world_aesthetic`, and with CPS rollouts
GRPO-Guard lowered the reward (see the recipe's comment). Every teacher is a rank-8 LoRA (alpha 8) on the attention
projections of the 6 joint blocks (~0.4 MB in float32), trained CFG-free with 10-step rollouts on one CPU core.

```python
from trl_diffusion_opd.world.teachers import evaluate_teacher, train_world_teacher

folder = train_world_teacher("composition", "teachers/composition")  # ~10 minutes of one CPU core
scores = evaluate_teacher(folder, tasks=("composition", "letters", "aesthetic"), num_images=256)
```

Held-out evaluation: prompts come from `scenes.task_prompts(task, n, seed=EVAL_SEED)` and the initial noise from
`pipeline.sample_images(..., seed=EVAL_SEED)`, for the base and the teacher alike (a paired comparison: same
prompts, same noise). The training stream uses `TRAIN_SEED`. The world's prompt grammar is finite (216 prompts, 12
of them letters), so held-out means unseen noise and scene draws, not necessarily unseen prompt texts.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import rewards as _world_rewards  # noqa: F401  (registers the world_* rewards)
from .pipeline import MAX_SEQUENCE_LENGTH, load_world_pipeline, sample_images
from .scenes import IMAGE_SIZE, TASK_FAMILIES, task_prompts


TEACHERS_DIR = Path(__file__).parent / "assets" / "teachers"
INDEX_FILE = "index.json"
SCORES_FILE = "scores.json"
TASKS = tuple(TASK_FAMILIES)  # composition, letters, aesthetic
TASK_REWARDS = {"composition": "world_composition", "letters": "world_letters", "aesthetic": "world_aesthetic"}
TRAIN_SEED = 0  # prompt stream of training
EVAL_SEED = 4321  # held-out prompts and initial noise (differs from pretraining's eval seed 1234 too)
TRAIN_PROMPTS = 2048  # prompt rows drawn per task for training (more than any run consumes)

# LoRA on every attention projection (image and text stream) of the 6 joint blocks: r=8 keeps a teacher ~0.4 MB.
ATTENTION_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass(frozen=True)
class TeacherRecipe:
    """How one world teacher is trained.

    Args:
        trainer: `"nft"` (`DiffusionNFTTrainer`) or `"grpo_guard"` (`FlowGRPOTrainer` with GRPO-Guard's RatioNorm).
        rewards: Reward names; `reward_weights` weighs them (the first one is the task's own reward).
        reward_weights: One weight per reward.
        max_steps: Optimizer steps.
        learning_rate: AdamW learning rate (constant after `warmup_steps`).
        num_generations: Images per prompt (the group).
        prompts_per_step: Prompts per optimizer step (`per_device_train_batch_size`).
        num_inference_steps: Sampler steps of the rollouts (evaluation uses 10 too).
        timestep_fraction: Train the first ⌊N·fraction⌋ steps (the high-noise ones decide layout and shape).
        guidance_scale: CFG scale of rollouts and loss (1: CFG-free, the base is evaluated without CFG).
        lora_rank: LoRA rank r (alpha = r).
        lora_targets: Module names the LoRA wraps.
        extra: Trainer-specific config fields (clip range, noise level, NFT β, ...).
        minutes: Measured wall-clock training time of the shipped teacher on one CPU core (documentation).
    """

    trainer: str
    rewards: tuple[str, ...]
    reward_weights: tuple[float, ...]
    max_steps: int
    learning_rate: float
    num_generations: int = 8
    prompts_per_step: int = 2
    num_inference_steps: int = 10
    timestep_fraction: float = 0.99
    guidance_scale: float = 1.0
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ATTENTION_TARGETS
    extra: dict[str, Any] = field(default_factory=dict)
    minutes: float | None = None


RECIPES: dict[str, TeacherRecipe] = {
    # DiffusionNFT, as the paper for GenEval. Deterministic Euler rollouts (Heun doubles the sampling cost for no gain
    # at 10 steps), CFG-free. Only the first half of the schedule is trained: layout, count and position are decided
    # at high noise, and halving the trained times halves the backward cost (~12.5 s per step of 32 images).
    "composition": TeacherRecipe(
        trainer="nft",
        rewards=("world_composition",),
        reward_weights=(1.0,),
        max_steps=50,
        learning_rate=1e-3,
        prompts_per_step=4,
        timestep_fraction=0.5,
        extra={"sampler": "euler", "nft_beta": 1.0, "old_policy_decay_rate": 0.01, "old_policy_max_decay": 0.5},
        minutes=10.6,
    ),
    # GRPO-Guard, as the paper for OCR. Flow-GRPO's SDE (noise level 0.7) gives the groups their spread; the residual
    # noise of its last step costs the letters reward little (~0.56 on the base's SDE rollouts, 0.61 on ODE ones). A
    # low learning rate: Adam's per-coordinate steps on a noisy 16-image gradient otherwise random-walk the adapter
    # (at 1e-3 the teacher reached 0.712 on the held-out set, at 3e-4 0.733).
    "letters": TeacherRecipe(
        trainer="grpo_guard",
        rewards=("world_letters",),
        reward_weights=(1.0,),
        max_steps=60,
        learning_rate=3e-4,
        extra={"noise_level": 0.7, "sde_type": "sde", "clip_range": 2e-6, "beta": 0.0},
        minutes=7.8,
    ),
    # DiffusionNFT, not the paper's GRPO-Guard: Flow-GRPO's SDE rollouts at noise level 0.7 end noisy, so every one
    # scores 0 on `world_aesthetic` (no group spread, no signal); with CPS rollouts (which do score ~0.55) GRPO-Guard
    # lowered the reward at lr 3e-3 and 1e-3 within 10-20 steps, while NFT on clean ODE samples raises it steadily.
    "aesthetic": TeacherRecipe(
        trainer="nft",
        rewards=("world_aesthetic",),
        reward_weights=(1.0,),
        max_steps=60,
        learning_rate=5e-4,
        extra={"sampler": "euler", "nft_beta": 1.0, "old_policy_decay_rate": 0.01, "old_policy_max_decay": 0.5},
        minutes=9.6,
    ),
}


# The paper's multi-task RL baseline on the world: one LoRA, every task's prompts (one prompt per task and step, so a
# step costs about as much as a teacher's 2-prompt step x 1.5), each image rewarded by its own task's reward
# (`world_task`), with the recipe that worked for two of the three teachers (DiffusionNFT, aesthetic's settings).
MULTITASK = "multitask"
RECIPES[MULTITASK] = TeacherRecipe(
    trainer="nft",
    rewards=("world_task",),
    reward_weights=(1.0,),
    max_steps=60,
    learning_rate=5e-4,
    prompts_per_step=1,
    extra=dict(RECIPES["aesthetic"].extra),
)


def train_multitask_world_baseline(
    output_dir: str | os.PathLike, max_steps: int | None = None, seed: int = 0, progress: bool = True, **overrides
) -> Path:
    """The multi-task RL row of the paper's table on the world (`RECIPES["multitask"]`): one LoRA trained with
    DiffusionNFT on the prompts of all three tasks, each scored by its own task's reward. Returns `output_dir`."""
    return train_world_teacher(MULTITASK, output_dir, max_steps=max_steps, seed=seed, progress=progress, **overrides)


def recipe_for(task: str, **overrides: Any) -> TeacherRecipe:
    """`RECIPES[task]` with `overrides` (any `TeacherRecipe` field; `extra` entries merge into the recipe's)."""
    if task not in RECIPES:
        raise ValueError(f"Unknown world task {task!r}; tasks are {list(RECIPES)}.")
    recipe = RECIPES[task]
    # Another trainer has other config fields: its `extra` replaces the recipe's instead of merging into it.
    base_extra = recipe.extra if overrides.get("trainer", recipe.trainer) == recipe.trainer else {}
    extra = {**base_extra, **overrides.pop("extra", {})}
    return replace(recipe, **overrides, extra=extra)


def build_teacher_trainer(
    task: str,
    output_dir: str | os.PathLike,
    recipe: TeacherRecipe | None = None,
    seed: int = 0,
    pipe=None,
    progress: bool = True,
    save_steps: int | None = None,
):
    """The RL trainer of `task`'s teacher on the shipped world base (offline), not yet trained.

    Args:
        task: `"composition"`, `"letters"` or `"aesthetic"`.
        output_dir: Where checkpoints and the final adapter go.
        recipe: The recipe (`RECIPES[task]` when `None`).
        seed: Seed of the adapter's initialisation and of every rollout.
        pipe: A world pipeline to train on (a fresh `load_world_pipeline()` when `None`; the trainer adds adapters
            to its transformer).
        progress: Show the trainer's progress bar.
        save_steps: Also save a checkpoint every this many optimizer steps (`None`: only the final adapter).
    """
    from peft import LoraConfig

    from .. import DiffusionNFTConfig, DiffusionNFTTrainer, FlowGRPOConfig, FlowGRPOTrainer

    recipe = recipe or RECIPES[task]
    pipe = pipe if pipe is not None else load_world_pipeline()
    common = {
        "output_dir": str(output_dir),
        "max_steps": recipe.max_steps,
        "learning_rate": recipe.learning_rate,
        "lr_scheduler_type": "constant",
        "resolution": IMAGE_SIZE,
        "num_inference_steps": recipe.num_inference_steps,
        "timestep_fraction": recipe.timestep_fraction,
        "num_generations": recipe.num_generations,
        "per_device_train_batch_size": recipe.prompts_per_step,
        "guidance_scale": recipe.guidance_scale,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "reward_weights": list(recipe.reward_weights),
        # All trained steps in one model call: rows = steps x images stays small (<= 160 rows of 256 tokens).
        "step_batch_size": None,
        "save_strategy": "steps" if save_steps else "no",
        "save_steps": save_steps or 500,
        "ema": False,  # the run is short; the adapter at the last step is the teacher
        "report_to": "none",
        "disable_tqdm": not progress,
        "logging_steps": 5,
        "seed": seed,
        # Pinned to the values the shipped teachers were trained with (the configs' defaults later moved to the
        # SD3.5 recipes' batch std and NFT's KL 1e-4), so that re-training reproduces them exactly.
        "scale_rewards": "group",
        "beta": 0.0,
    }
    if recipe.trainer == "nft":
        config_class, trainer_class = DiffusionNFTConfig, DiffusionNFTTrainer
    elif recipe.trainer == "grpo_guard":
        config_class, trainer_class = FlowGRPOConfig, FlowGRPOTrainer
        common["ratio_normalization"] = "grpo_guard"
    else:
        raise ValueError(f"Unknown trainer {recipe.trainer!r}; use 'nft' or 'grpo_guard'.")
    args = config_class(**{**common, **recipe.extra})
    peft_config = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_rank,
        init_lora_weights="gaussian",
        target_modules=list(recipe.lora_targets),
    )
    if task == MULTITASK:  # every task's prompts, visited round-robin like DiffusionOPD's
        rows = {name: task_prompts(name, TRAIN_PROMPTS, seed=TRAIN_SEED) for name in TASKS}
    else:
        rows = task_prompts(task, TRAIN_PROMPTS, seed=TRAIN_SEED)
    return trainer_class(pipe, list(recipe.rewards), args=args, train_dataset=rows, peft_config=peft_config)


def train_world_teacher(
    task: str,
    output_dir: str | os.PathLike,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    save_steps: int | None = None,
    **overrides: Any,
) -> Path:
    """Train `task`'s teacher on the shipped base with its recipe and save it to `output_dir`.

    Args:
        task: `"composition"`, `"letters"` or `"aesthetic"`.
        output_dir: Receives `pytorch_lora_weights.safetensors` (diffusers format), the model card `README.md` and
            `training.json` (recipe, seed, wall-clock seconds).
        max_steps: Optimizer steps (the recipe's when `None`; 1-2 make a smoke test of the real recipe).
        seed: Seed of the adapter's initialisation and of the rollouts.
        progress: Show the progress bar.
        save_steps: Intermediate checkpoints every this many steps (`None`: none).
        **overrides: Other `TeacherRecipe` fields (e.g. `learning_rate=1e-3`, `num_generations=4`).

    Returns:
        `output_dir` as a `Path`.
    """
    torch.manual_seed(seed)
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    recipe = recipe_for(task, **overrides)
    output_dir = Path(output_dir)
    trainer = build_teacher_trainer(task, output_dir, recipe, seed=seed, progress=progress, save_steps=save_steps)
    from .progress import PhaseProgress, set_progress

    # one bar per teacher with its reward, not a metrics dict printed every `logging_steps`
    set_progress(trainer, progress, PhaseProgress(f"teacher: {task}", keys=("reward",), unit="step"))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(output_dir))
    info = {
        "task": task,
        "recipe": asdict(recipe),
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "final_train_reward": next((h["reward"] for h in reversed(trainer.state.log_history) if "reward" in h), None),
    }
    (output_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return output_dir


# ---------------------------------------------------------------------------------------------- scoring
def load_teacher_pipeline(folder: str | os.PathLike | None, base: str | os.PathLike | None = None):
    """The world base (`base`, the shipped one when `None`) with the LoRA in `folder` loaded through diffusers'
    `load_lora_weights` (plain base when `folder` is `None`)."""
    pipe = load_world_pipeline(base)
    if folder is not None:
        pipe.load_lora_weights(str(folder))
    return pipe


def heldout_prompts(task: str, num_images: int, seed: int = EVAL_SEED) -> list[str]:
    """The held-out prompts of `task`: `num_images` rows of `task_prompts(task, ., seed)`."""
    return [row["prompt"] for row in task_prompts(task, num_images, seed=seed)]


@torch.no_grad()
def score_pipeline(
    pipe,
    tasks: tuple[str, ...] = TASKS,
    num_images: int = 256,
    seed: int = EVAL_SEED,
    num_inference_steps: int = 10,
    guidance_scale: float = 1.0,
    per_image: bool = False,
    prompt_templates: dict[str, str] | None = None,
) -> dict:
    """Each task's own reward (in [0, 1]) on its held-out prompts, sampled with the ODE sampler.

    Args:
        pipe: A world pipeline (with or without a LoRA).
        tasks: The tasks to score.
        num_images: Images (= prompts) per task.
        seed: Prompt draw and initial noise; equal seeds give equal prompts and noise whatever the weights.
        num_inference_steps, guidance_scale: Sampler settings (the base's recorded scores use 10 and 1).
        per_image: Also return the per-image scores under `"<task>/values"`.
        prompt_templates: `{task: template with "{prompt}"}`: sample that task's images from the templated prompt
            (a student trained with `task_prompt_templates`); the reward still reads the prompt as written.

    Returns:
        `{task: mean reward}` (plus `"composition_binary"`, GenEval's success rate, when composition is scored).
    """
    from ..rewards import get_reward, nanmean

    scores: dict = {}
    for task in tasks:
        prompts = heldout_prompts(task, num_images, seed)
        template = (prompt_templates or {}).get(task, "{prompt}")
        texts = [template.format(prompt=prompt) for prompt in prompts]
        images = sample_images(pipe, texts, num_inference_steps, guidance_scale, seed=seed)
        values = get_reward(TASK_REWARDS[task])(images, prompts)
        scores[task] = nanmean(values)
        if per_image:
            scores[f"{task}/values"] = [float(v) for v in values]
        if task == "composition":
            scores["composition_binary"] = nanmean(get_reward("world_composition", mode="binary")(images, prompts))
    return scores


def evaluate_teacher(
    folder: str | os.PathLike,
    tasks: tuple[str, ...] = TASKS,
    num_images: int = 256,
    seed: int = EVAL_SEED,
    num_inference_steps: int = 10,
    guidance_scale: float = 1.0,
    base_scores: dict | None = None,
) -> dict:
    """Paired comparison of the base and the LoRA in `folder` on every task's reward (same prompts, same noise).

    Args:
        folder: A diffusers-format LoRA folder.
        tasks, num_images, seed, num_inference_steps, guidance_scale: See `score_pipeline`.
        base_scores: The base's `score_pipeline` result with the same settings, to skip recomputing it.

    Returns:
        `{"base": {...}, "teacher": {...}, "delta": {task: teacher - base}, "settings": {...}}`.
    """
    settings = {
        "num_images": num_images,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
    }
    if base_scores is None:
        base_scores = score_pipeline(
            load_teacher_pipeline(None), tasks, num_images, seed, num_inference_steps, guidance_scale
        )
    teacher = score_pipeline(
        load_teacher_pipeline(folder), tasks, num_images, seed, num_inference_steps, guidance_scale
    )
    delta = {key: teacher[key] - base_scores[key] for key in teacher if key in base_scores}
    return {"base": base_scores, "teacher": teacher, "delta": delta, "settings": settings}


def shipped_teachers() -> dict:
    """`TEACHERS_DIR/index.json`: `{task: {"folder", "trainer", "reward", "scores", ...}}` (folders relative to
    `TEACHERS_DIR`)."""
    return json.loads((TEACHERS_DIR / INDEX_FILE).read_text())


def teacher_folder(task: str) -> Path:
    """The folder of the shipped teacher of `task`."""
    return TEACHERS_DIR / shipped_teachers()[task]["folder"]


def write_scores(folder: str | os.PathLike, task: str, result: dict) -> dict:
    """Write `folder/scores.json`: the paired base-vs-teacher scores of `evaluate_teacher` on all three rewards, plus
    the training record (`training.json`: recipe, seed, seconds) when present. Returns what was written."""
    folder = Path(folder)
    training = folder / "training.json"
    record = {"task": task, "reward": TASK_REWARDS[task], **result}
    if training.is_file():
        info = json.loads(training.read_text())
        record["training"] = {k: info[k] for k in ("seed", "train_seconds", "torch_threads", "recipe") if k in info}
    (folder / SCORES_FILE).write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(folder, task, record)
    return record


def write_model_card(folder: str | os.PathLike, task: str, record: dict) -> Path:
    """Write `folder/README.md`: what the teacher is, how it was trained, how to load it, its held-out scores."""
    recipe = record.get("training", {}).get("recipe") or asdict(RECIPES[task])
    trainer = {"nft": "DiffusionNFT (`DiffusionNFTTrainer`)", "grpo_guard": "GRPO-Guard (`FlowGRPOTrainer`)"}
    settings = record["settings"]
    labels = {
        **{name: f"`{TASK_REWARDS[name]}`" for name in TASKS},
        "composition_binary": "`world_composition` (binary)",
    }
    rows = "\n".join(
        f"| {labels[name]}{' (own)' if name == task else ''} | {record['base'][name]:.3f} | "
        f"{record['teacher'][name]:.3f} | {record['delta'][name]:+.3f} |"
        for name in labels
        if name in record["teacher"]
    )
    seconds = record.get("training", {}).get("train_seconds")
    card = f"""---
library_name: diffusers
tags:
- trl-diffusion-opd
- world
- lora
- {TASK_REWARDS[task]}
---

# World teacher: {task}

Stage-1 LoRA teacher of the tiny world's `{task}` task, trained on the shipped world base
(`trl_diffusion_opd/world/assets/base`) with {trainer[recipe["trainer"]]} on the reward(s)
{", ".join(f"`{r}`" for r in recipe["rewards"])}. Made by `trl_diffusion_opd.world.teachers.train_world_teacher`.

```python
from trl_diffusion_opd.world.pipeline import load_world_pipeline, sample_images

pipe = load_world_pipeline()
pipe.load_lora_weights("trl_diffusion_opd/world/assets/teachers/{task}")
images = sample_images(pipe, ["a red circle"], num_inference_steps=10)  # or pipe(..., max_sequence_length=1)
```

## Training

LoRA r={recipe["lora_rank"]}, alpha={recipe["lora_rank"]} on {", ".join(recipe["lora_targets"])}; {recipe["max_steps"]}
optimizer steps at learning rate {recipe["learning_rate"]:g} (AdamW, constant); {recipe["prompts_per_step"]} prompts
x {recipe["num_generations"]} images per step; {recipe["num_inference_steps"]} sampler steps, trained fraction
{recipe["timestep_fraction"]:g}; CFG {recipe["guidance_scale"]:g}; trainer settings {json.dumps(recipe["extra"])};
seed {record.get("training", {}).get("seed", 0)}; {f"{seconds / 60:.1f} minutes" if seconds else "time not recorded"}
on one CPU core.

## Held-out scores

{settings["num_images"]} held-out prompts per task (`scenes.task_prompts(task, n, seed={settings["seed"]})`), the same
initial noise for base and teacher (`sample_images(..., seed={settings["seed"]})`), {settings["num_inference_steps"]}
Euler steps, CFG {settings["guidance_scale"]:g}. Rewards in [0, 1].

| reward | base | teacher | delta |
|---|---|---|---|
{rows}
"""
    path = Path(folder) / "README.md"
    path.write_text(card)
    return path


def write_index(root: str | os.PathLike, records: dict[str, dict]) -> dict:
    """Write `root/index.json` (`{task: {"folder", "trainer", "reward", "scores"}}`, folders relative to `root`)
    from the `write_scores` records; call it last, once every teacher is final (other tools wait for this file).
    Entries of an existing index for other tasks whose folders are still there are kept (re-training one teacher
    does not drop the others)."""
    path = Path(root, INDEX_FILE)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    index = {
        task: entry
        for task, entry in previous.items()
        if task not in records and task in TASKS and Path(root, entry["folder"]).is_dir()
    }
    for task, record in records.items():
        recipe = record.get("training", {}).get("recipe") or asdict(RECIPES[task])
        index[task] = {
            "folder": task,
            "trainer": {"nft": "DiffusionNFTTrainer", "grpo_guard": "FlowGRPOTrainer (GRPO-Guard)"}[recipe["trainer"]],
            "reward": TASK_REWARDS[task],
            "rewards": list(recipe["rewards"]),
            "scores": {"base": record["base"], "teacher": record["teacher"], "delta": record["delta"]},
            "settings": record["settings"],
        }
    index = {task: index[task] for task in TASKS if task in index}  # a stable order
    path.write_text(json.dumps(index, indent=2) + "\n")
    return index


def train_and_score_teachers(
    tasks: list[str] | tuple[str, ...] = TASKS,
    output_dir: str | os.PathLike = TEACHERS_DIR,
    max_steps: int | None = None,
    seed: int = 0,
    num_images: int = 256,
    eval_seed: int = EVAL_SEED,
    train: bool = True,
    progress: bool = True,
) -> dict:
    """Train (unless `train=False`) and score the teachers of `tasks` in `output_dir/<task>/`, then write
    `output_dir/index.json`. What `trl-diffusion-opd world teachers` runs.

    Args:
        tasks: World tasks.
        output_dir: Root folder.
        max_steps: Optimizer steps per teacher (each recipe's when `None`).
        seed: Training seed.
        num_images: Held-out images per task and reward (all three rewards are scored for every teacher).
        eval_seed: Held-out prompts and initial noise.
        train: Train first; `False` scores the adapters already there.
        progress: Progress bars (one over tasks, the trainer's own over steps).

    Returns:
        The index.
    """
    from tqdm.auto import tqdm

    root = Path(output_dir)
    records = {}
    base_scores = None
    bar = tqdm(list(tasks), desc="world teachers", disable=not progress)
    for task in bar:
        folder = root / task
        if train:
            bar.set_postfix_str(f"training {task}")
            train_world_teacher(task, folder, max_steps=max_steps, seed=seed, progress=progress)
        bar.set_postfix_str(f"scoring {task}")
        if base_scores is None:
            base_scores = score_pipeline(load_teacher_pipeline(None), TASKS, num_images, eval_seed)
        result = evaluate_teacher(folder, TASKS, num_images, eval_seed, base_scores=base_scores)
        records[task] = write_scores(folder, task, result)
    return write_index(root, records)
