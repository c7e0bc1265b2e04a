"""Rectified-flow pretraining of the world pipeline's transformer on the world's ground-truth images.

Per step (diffusers' SD3 convention): images x0 in [-1, 1] (the identity VAE's latents), t from a logit-normal
(or uniform) distribution pushed through the scheduler's shift, x_t = (1 - t) x0 + t eps, target eps - x0, loss
the mean squared error of the transformer's prediction at timestep 1000 t. Prompts are dropped (replaced by "") with
probability `caption_dropout` so that classifier-free guidance works.

Everything a step uses is a function of (seed, step): the scenes of step s are `scene_at(seed, s * B + i)`, its
noise and timesteps come from a generator seeded by (seed, s). A run stopped anywhere (Ctrl-C, `--max_minutes`, a
crash) and resumed from its last checkpoint therefore ends with the same weights as an uninterrupted run.

```bash
trl-diffusion-opd world pretrain --output_dir world-base --steps 20000 --batch_size 256 --device cuda \
    --mixed_precision bf16 --num_workers 8 --max_minutes 60
```

writes `world-base/checkpoint/` (resumable state) and `world-base/pipeline/` (the fp16 pipeline with its
`world_scores.json`: the end-of-training rewards per task).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Dataset

from ..safe_io import load_weights_only
from .pipeline import (
    SCORES_FILE,
    WorldModelConfig,
    build_world_pipeline,
    encode_prompts,
    sample_images,
    save_world_pipeline,
)
from .scenes import IMAGE_SIZE, all_prompts, render, scene_at, task_scenes


CHECKPOINT_DIR = "checkpoint"
PIPELINE_DIR = "pipeline"


@dataclass
class PretrainConfig:
    """Arguments of `pretrain` (and of `trl-diffusion-opd world pretrain`)."""

    output_dir: str = "world-base"
    steps: int = 20000
    batch_size: int = 128
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999  # 0 disables EMA; the saved pipeline then holds the raw weights
    caption_dropout: float = 0.1
    timestep_sampling: str = "logit_normal"  # or "uniform"
    seed: int = 0
    device: str = "cpu"
    mixed_precision: str = "no"  # "bf16" or "fp16" autocast on CUDA; weights and optimizer stay float32
    num_workers: int = 0
    max_minutes: float | None = None
    save_every: int = 500
    log_every: int = 50
    eval_images: int = 128  # per task, at the end; 0 skips the evaluation
    eval_steps: int = 10
    eval_guidance_scale: float = 1.0
    progress: bool = True
    model: WorldModelConfig = field(default_factory=WorldModelConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = WorldModelConfig.from_dict(self.model)
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"timestep_sampling must be 'logit_normal' or 'uniform', got {self.timestep_sampling!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")


class WorldBatches(Dataset):
    """Item s is step s's batch: uint8 images `(B, 32, 32, 3)` and prompt indices `(B,)` into `prompts`."""

    def __init__(self, seed: int, batch_size: int, prompts: list[str]):
        self.seed, self.batch_size = seed, batch_size
        self.index = {prompt: i for i, prompt in enumerate(prompts)}

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int):
        batch = [scene_at(self.seed, step * self.batch_size + i) for i in range(self.batch_size)]
        images = torch.from_numpy(np.stack([render(scene) for scene in batch]))
        ids = torch.tensor([self.index[scene.prompt] for scene in batch], dtype=torch.long)
        return images, ids


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sample_timesteps(batch: int, shift: float, method: str, generator: torch.Generator) -> torch.Tensor:
    """Training sigmas `(B,)` in (0, 1): logit-normal(0, 1) or uniform, then the scheduler's shift
    `s t / (1 + (s - 1) t)` so that training sees the noise levels the sampler visits."""
    if method == "uniform":
        t = torch.rand(batch, generator=generator)
    else:
        t = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_matching_loss(transformer, x0: torch.Tensor, cond: dict, t: torch.Tensor, noise: torch.Tensor):
    """Rectified-flow loss: mean over elements of (v(x_t, t) - (eps - x0))^2 with x_t = (1 - t) x0 + t eps."""
    t_ = t.view(-1, 1, 1, 1)
    x_t = (1.0 - t_) * x0 + t_ * noise
    pred = transformer(
        hidden_states=x_t,
        timestep=t * 1000.0,
        encoder_hidden_states=cond["prompt_embeds"],
        pooled_projections=cond["pooled_prompt_embeds"],
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(pred.float(), noise - x0)


def load_checkpoint_state(path: str | os.PathLike) -> dict:
    """Read a pretraining checkpoint (`checkpoint/state.pt`) with `weights_only=True`: tensors, numbers, strings and
    containers only, so a tampered file raises instead of running code."""
    return load_weights_only(path)


def _save_checkpoint(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / "state.pt")  # atomic: a kill while saving leaves the previous checkpoint intact


def evaluate_world(
    pipe, num_images: int = 128, num_inference_steps: int = 10, guidance_scale: float = 1.0, seed: int = 1234
) -> dict:
    """Sample `num_images` prompts per world task and score them with the task's reward.

    Returns:
        `{"composition": soft score, "composition_binary": GenEval success rate, "composition/<family>": soft
        score per family, "letters": ..., "aesthetic": ..., "settings": {...}}`, scores in [0, 1].
    """
    from ..rewards import get_reward, nanmean

    scores: dict = {}
    for task, reward_name in (
        ("composition", "world_composition"),
        ("letters", "world_letters"),
        ("aesthetic", "world_aesthetic"),
    ):
        batch = task_scenes(task, num_images, seed)
        prompts = [scene.prompt for scene in batch]
        images = sample_images(pipe, prompts, num_inference_steps, guidance_scale, seed=seed)
        values = get_reward(reward_name)(images, prompts)
        scores[task] = nanmean(values)
        if task == "composition":
            scores["composition_binary"] = nanmean(get_reward(reward_name, mode="binary")(images, prompts))
            for family in sorted({scene.family for scene in batch}):
                scores[f"composition/{family}"] = nanmean(
                    [v for v, scene in zip(values, batch, strict=True) if scene.family == family]
                )
    scores["settings"] = {
        "num_images": num_images,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
    return scores


def pretrain(config: PretrainConfig, on_step: Callable[[int, float], None] | None = None) -> Path:
    """Pretrain (or resume pretraining) a world pipeline; returns the saved pipeline folder.

    Resumes from `output_dir/checkpoint/state.pt` when it exists (its model config wins over `config.model`).
    Stops after `config.steps` steps or `config.max_minutes` of this run, checkpoints, saves the pipeline (EMA
    weights when EMA is on) in fp16 to `output_dir/pipeline/`, evaluates it and writes the scores there
    (`world_scores.json`) and to `output_dir/world_scores.json`.

    Args:
        config: The run.
        on_step: Called as `on_step(step, loss)` after each optimizer step (and after its checkpoint, if any).
    """
    from tqdm.auto import tqdm

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint_file = output / CHECKPOINT_DIR / "state.pt"
    state = load_checkpoint_state(checkpoint_file) if checkpoint_file.is_file() else None
    if state is not None:
        config.model = WorldModelConfig.from_dict(state["model_config"])
    device = torch.device(config.device)

    pipe = build_world_pipeline(config.model).to(device)
    prompts = ["", *all_prompts()]
    cond_all = {k: v.float().to(device) for k, v in encode_prompts(pipe, prompts).items()}  # frozen encoders
    transformer = pipe.transformer
    transformer.requires_grad_(True)
    transformer.train()
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.99)
    )
    ema = EMAModel(parameters, decay=config.ema_decay) if config.ema_decay > 0 else None
    start = 0
    if state is not None:
        transformer.load_state_dict(state["transformer"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
            ema.to(device)
        start = int(state["step"])

    def save(step: int) -> None:
        _save_checkpoint(
            output / CHECKPOINT_DIR,
            {
                "step": step,
                "transformer": transformer.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "model_config": dataclasses.asdict(config.model),
                "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "model"},
            },
        )

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    use_autocast = autocast_dtype is not None and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_autocast and autocast_dtype == torch.float16)
    loader = DataLoader(
        WorldBatches(config.seed, config.batch_size, prompts),
        batch_size=None,
        sampler=range(start, config.steps),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    empty = torch.zeros((), dtype=torch.long)
    began = time.monotonic()
    bar = tqdm(total=config.steps, initial=start, disable=not config.progress, desc="world pretrain", unit="step")
    step, losses, log = start, [], []
    for images, ids in loader:
        generator = _step_generator(config.seed, step)
        batch = ids.shape[0]
        drop = torch.rand(batch, generator=generator) < config.caption_dropout
        ids = torch.where(drop, empty, ids).to(device)
        t = sample_timesteps(batch, config.model.shift, config.timestep_sampling, generator).to(device)
        noise = torch.randn((batch, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator).to(device)
        x0 = images.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        cond = {k: v[ids] for k, v in cond_all.items()}
        lr = config.learning_rate * min(1.0, (step + 1) / max(1, config.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=use_autocast):
            loss = flow_matching_loss(transformer, x0, cond, t, noise)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.step(parameters)  # with diffusers' decay warm-up: early steps do not average in the random init
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.monotonic() - began
            entry = {
                "step": step,
                "loss": float(np.mean(losses)),
                "lr": lr,
                "images_per_s": (step - start) * config.batch_size / max(elapsed, 1e-9),
            }
            log.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", img_s=f"{entry['images_per_s']:.0f}")
            losses = []
        out_of_time = config.max_minutes is not None and time.monotonic() - began > 60 * config.max_minutes
        if step % config.save_every == 0 or step == config.steps or out_of_time:
            save(step)
        if on_step is not None:
            on_step(step, log[-1]["loss"] if log else math.nan)
        if out_of_time:
            break
    bar.close()
    if step == start:
        save(step)
    with (output / "log.jsonl").open("a") as handle:
        for entry in log:
            handle.write(json.dumps(entry) + "\n")

    if ema is not None:
        ema.copy_to(parameters)
    transformer.requires_grad_(False)
    transformer.eval()
    folder = save_world_pipeline(pipe, output / PIPELINE_DIR)
    scores = {"step": step, "images_seen": step * config.batch_size}
    if config.eval_images > 0:
        scores.update(
            evaluate_world(pipe, config.eval_images, config.eval_steps, config.eval_guidance_scale, seed=1234)
        )
    text = json.dumps(scores, indent=2) + "\n"
    (folder / SCORES_FILE).write_text(text)
    (output / SCORES_FILE).write_text(text)
    return folder
