"""Callbacks of the trainers: the student's rewards and sample grids during training (`RewardEvalCallback`), and a
TensorBoard callback that accepts diffusers models."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from ..data import prompts_by_task, row_images
from ..evaluation import SAMPLES_DIR
from ..figures import VIDEO_FORMATS, blank_like, frame_grid, is_video, make_grid, save_video
from ..rewards import as_reward, nanmean, parse_reward_spec


def _parse_rewards(rewards: Any, tasks: list[str]) -> dict[str, list]:
    """`{task: [reward, ...]}` from one reward, a list for every task, a `{task: reward(s)}` mapping, or JSON."""
    spec = parse_reward_spec(rewards)
    if isinstance(spec, dict):
        unknown = [task for task in spec if task not in tasks]
        if unknown:
            raise ValueError(f"Rewards are given for unknown task(s) {unknown}; tasks are {tasks}.")
        return {task: spec.get(task, []) for task in tasks}
    return {task: list(spec) for task in tasks}


def _file_part(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "task"


class RewardEvalCallback(TrainerCallback):
    """Every `eval_steps`, sample fixed prompts per task with the student (EMA weights when EMA is on), log each
    configured reward's mean as `rewards/{task}/{reward}`, and write one grid (a row per task) to
    `output_dir/samples/step-{step}.png` and to TensorBoard / Weights & Biases when they are in `report_to`. At the
    end of training the last grid is sampled (if that step was not) and becomes the model card's widget.

    Video families (Wan): the rewards score the videos (image rewards frame by frame, averaged), the grid is a frame
    grid (a row of frames per video, labelled with its task and prompt), and each task's first video is written as
    `samples/step-{step}-{task}.{video_format}`; the card shows those videos and the grid.

    Args:
        trainer: The trainer (a `DiffusionLoRATrainer` subclass); or call `bind(trainer)` later.
        rewards: Reward names (or `Reward`s / functions): one, a list for every task, or `{task: [rewards]}`
            (also as JSON or `"a,b"`); `None` samples grids only.
        prompts: `{task: prompts}` sampled each time; `None` takes each task's held-out prompts (`eval_dataset`),
            else its training prompts; each task keeps its first `num_prompts`.
        eval_steps: Interval in optimizer steps; `None` uses `args.eval_steps` (a float < 1 is a fraction of
            `max_steps`); without either, only the end of training is sampled.
        num_prompts: Prompts per task.
        num_inference_steps: Sampler steps; `None` uses the training rollout's.
        seed: Seed of the initial noise (the same every time, so grids are comparable across steps).
        reward_kwargs: `{reward name: kwargs of get_reward}`.
        grid_image_size: Side of a grid tile in pixels (`None`: the generated size).
        video_format: `webp` (default) or `gif`, shown inline on the Hub, or `mp4` (extra `video`).
        fps: Frames per second of the videos.
        max_grid_frames: Frames per video in the frame grid (spread evenly; `None`: all).
    """

    def __init__(
        self,
        trainer: Trainer | None = None,
        rewards: Any = None,
        prompts: dict[str, Any] | None = None,
        eval_steps: float | None = None,
        num_prompts: int = 4,
        num_inference_steps: int | None = None,
        seed: int = 0,
        reward_kwargs: dict[str, dict[str, Any]] | None = None,
        grid_image_size: int | None = 256,
        video_format: str = "webp",
        fps: int = 16,
        max_grid_frames: int | None = 8,
    ):
        if video_format not in VIDEO_FORMATS:
            raise ValueError(f"`video_format` must be one of {', '.join(VIDEO_FORMATS)}, got {video_format!r}.")
        self.rewards_spec = rewards
        self.prompts_spec = prompts
        self.eval_steps = eval_steps
        self.num_prompts = num_prompts
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.reward_kwargs = reward_kwargs or {}
        self.grid_image_size = grid_image_size
        self.video_format = video_format
        self.fps = fps
        self.max_grid_frames = max_grid_frames
        self.trainer = None
        self.last_step: int | None = None
        self.history: list[dict[str, float]] = []
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer: Trainer) -> RewardEvalCallback:
        """Attach to `trainer`: fix the prompts and load the rewards (once)."""
        self.trainer = trainer
        if self.prompts_spec is not None:
            prompts = prompts_by_task(self.prompts_spec)
        else:  # per task: its held-out prompts when it has some, else its training prompts
            held_out = trainer.eval_prompts or {}
            prompts = {task: held_out.get(task) or rows for task, rows in trainer.task_prompts.items()}
        self.prompts = {task: list(rows)[: self.num_prompts] for task, rows in prompts.items()}
        specs = _parse_rewards(self.rewards_spec, list(self.prompts))
        self.rewards = {
            task: [
                as_reward(item, **self.reward_kwargs.get(item, {})) if isinstance(item, str) else as_reward(item)
                for item in items
            ]
            for task, items in specs.items()
        }
        return self

    def _interval(self, args, state) -> int | None:
        steps = self.eval_steps if self.eval_steps is not None else getattr(args, "eval_steps", None)
        if not steps:
            return None
        if steps < 1:
            steps = math.ceil(state.max_steps * steps)
        return max(1, int(steps))

    def on_step_end(self, args, state, control, **kwargs):
        interval = self._interval(args, state)
        if interval and state.global_step % interval == 0:
            should_log = control.should_log
            self.evaluate(state.global_step)
            # Logging resets `should_log`, which would drop the Trainer's own log (loss, grad_norm) of this step.
            control.should_log = should_log

    def on_train_end(self, args, state, control, **kwargs):
        if self.last_step != state.global_step:
            self.evaluate(state.global_step)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Sample, score, log and write the grid of `step` (on the main process); returns the logged metrics."""
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("RewardEvalCallback is not bound to a trainer: pass it or call `bind(trainer)`.")
        self.last_step = step
        if not trainer.is_world_process_zero():
            return {}
        metrics: dict[str, float] = {}
        grid_rows, captions, labels = [], [], []
        for task, rows in self.prompts.items():
            texts = [row["prompt"] for row in rows]
            inputs = [row_images(row) for row in rows]
            # the student is sampled with the prompt it was trained on for the task; rewards read the prompt as written
            images = trainer.generate(
                trainer.student_prompts(task, texts),
                seed=self.seed,
                num_inference_steps=self.num_inference_steps,
                images=inputs if any(inputs) else None,
            )
            for reward in self.rewards[task]:
                metrics[f"rewards/{task}/{reward.name}"] = nanmean(reward(images, texts, rows))
            if any(inputs) and not is_video(images[0]):  # editing: each sample's first input image above it
                grid_rows.append([blank_like((row or [None])[0], image) for row, image in zip(inputs, images)])
            grid_rows.append(images)
            edit = " (inputs above outputs)" if any(inputs) else ""
            captions.append(f"{task}{edit}: " + " | ".join(texts))
            labels.extend(f"{task}: {text}" for text in texts)
        folder = Path(trainer.args.output_dir) / SAMPLES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}.png"
        caption = "\n".join(captions)
        widgets = []
        if any(is_video(sample) for images in grid_rows for sample in images):
            grid = frame_grid(
                [v for videos in grid_rows for v in videos], labels, self.max_grid_frames, self.grid_image_size
            )
            for task, videos, rows in zip(self.prompts, grid_rows, self.prompts.values()):
                if not videos:
                    continue
                video_name = f"step-{step:06d}-{_file_part(task)}.{self.video_format}"
                save_video(videos[0], folder / video_name, self.fps)
                widgets.append({"text": f"{task}: {rows[0]['prompt']}", "url": f"{SAMPLES_DIR}/{video_name}"})
        else:
            grid = make_grid(grid_rows, self.grid_image_size)
        grid.save(folder / name)
        trainer.sample_widgets = widgets + [{"text": caption.replace("\n", " · "), "url": f"{SAMPLES_DIR}/{name}"}]
        self._to_trackers(grid, caption, step)
        if metrics:
            # The base `Trainer.log`: the trainer's own `log` would pull the round metrics gathered for the next
            # logging step into this entry. (`log` adds the epoch to the dict it gets: a copy.)
            Trainer.log(trainer, dict(metrics))
        self.history.append({"step": step, **metrics})
        return metrics

    def _to_trackers(self, grid: Image.Image, caption: str, step: int) -> None:
        import numpy as np
        from transformers.integrations import WandbCallback

        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
                callback.tb_writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
                callback.tb_writer.flush()
            elif isinstance(callback, WandbCallback) and getattr(callback, "_wandb", None) is not None:
                if getattr(callback._wandb, "run", None) is not None:
                    image = callback._wandb.Image(grid, caption=caption)
                    callback._wandb.log({"samples": image, "train/global_step": step})


class DiffusersTensorBoardCallback(TensorBoardCallback):
    """`TensorBoardCallback` for diffusers models: transformers' writes `model.config.to_json_string()` at the start
    of training, which a diffusers model's `FrozenDict` config does not have (`report_to="tensorboard"` would fail);
    this one writes the config as JSON itself."""

    def on_train_begin(self, args, state, control, **kwargs):
        model = kwargs.pop("model", None)
        super().on_train_begin(args, state, control, **kwargs)
        config = getattr(model, "config", None)
        if state.is_world_process_zero and self.tb_writer is not None and config is not None:
            self.tb_writer.add_text("model_config", json.dumps(dict(config), indent=2, default=str))
