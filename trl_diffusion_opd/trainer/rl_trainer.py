"""`DiffusionRLTrainer`: what the reward-driven Stage-1 trainers (Flow-GRPO, DiffusionNFT) share.

Each optimizer step: the prompts of the step (`per_device_train_batch_size` per task, round-robin over tasks like
DiffusionOPD) are repeated `num_generations` times; the subclass samples one image per row (`generate_batch`); the
reward functions score the decoded images; the weighted total reward becomes group-normalised, clipped advantages;
the subclass's `compute_rl_loss` back-propagates its objective. With `num_iterations > 1` the generated batch is
reused for that many optimizer steps; a checkpoint taken in the middle of such a cycle stores the batch
(`rl_batch-<process>.safetensors`, tensors in safetensors, prompt rows in JSON), so that resuming from it continues
bit for bit. A batch that cannot be stored so (metadata that is not JSON) is regenerated on resume, with a warning:
then the resumed run differs from an uninterrupted one.
"""

from __future__ import annotations

import abc
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from transformers import TrainerCallback
from transformers.utils import logging

from ..objectives import group_advantages
from ..rewards import Reward, as_reward, nanmean
from ..safe_io import load_tensor_tree, save_tensor_tree
from .base_trainer import DiffusionLoRATrainer, prompt_rows
from .module_walks import ensure_eval
from .rl_config import DiffusionRLConfig


logger = logging.get_logger(__name__)
RL_BATCH = "rl_batch-{process}.safetensors"
RewardFunc = str | Reward | Callable[[list, list[str], list[dict]], Sequence[float]]


def _reward_list(reward_funcs: RewardFunc | Sequence[RewardFunc]) -> list[Reward]:
    if reward_funcs is None:
        raise ValueError("`reward_funcs` is required: a reward name (e.g. 'brightness'), a `Reward` or a function.")
    items = [reward_funcs] if isinstance(reward_funcs, (str, Reward)) or callable(reward_funcs) else reward_funcs
    items = list(items)
    if not items:
        raise ValueError("`reward_funcs` is empty.")
    rewards = [as_reward(item) for item in items]
    names = [reward.name for reward in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"Reward names must be distinct (they name the logged metrics), got {names}.")
    return rewards


class DiffusionRLTrainer(DiffusionLoRATrainer, abc.ABC):
    """Base of `FlowGRPOTrainer` and `DiffusionNFTTrainer` (see the module docstring).

    Args:
        model: The base pipeline: a Hub id, a local path, or a `DiffusionPipeline`.
        reward_funcs: One reward or a list: registry names (`"ocr"`, `"pickscore"`, `"brightness"`, ...; see
            `trl_diffusion_opd.rewards`), `Reward` objects, or functions `fn(images, prompts, metadata) -> scores`.
            Several rewards are summed with `args.reward_weights` (the paper's multi-task baselines).
        args: The trainer's config.
        train_dataset: Prompts with their metadata: a list of prompts, a dataset or file with a `prompt` column (a
            `task` column groups them), or `{task: source}`.
        eval_dataset: Held-out prompts in the same forms (used by `RewardEvalCallback` grids).
        peft_config: The student adapter; `None` uses the family's default. Ignored with `args.student_adapter`.
        callbacks: Extra `TrainerCallback`s.
    """

    def __init__(
        self,
        model: str | DiffusionPipeline,
        reward_funcs: RewardFunc | Sequence[RewardFunc],
        args: DiffusionRLConfig,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ):
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: the training prompts.")
        self.reward_funcs = _reward_list(reward_funcs)
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"`reward_weights` has {len(weights)} values for {len(self.reward_funcs)} reward functions "
                f"({[r.name for r in self.reward_funcs]})."
            )
        self.reward_weights = [float(w) for w in weights]
        self.task_prompts = prompt_rows(train_dataset)
        self.eval_prompts = prompt_rows(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self._buffer: dict[str, Any] | None = None
        super().__init__(model, args, peft_config=peft_config, callbacks=callbacks)

    # ------------------------------------------------------------------ rewards
    def score(self, images: list, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score decoded images with every reward function.

        Returns:
            `(total, scores)`: the weighted total `(R,)` (a `nan` score counts 0) and the raw scores `(K, R)`.
        """
        prompts = [row["prompt"] for row in rows]
        scores = torch.tensor([reward(images, prompts, rows) for reward in self.reward_funcs], dtype=torch.float32)
        weights = torch.tensor(self.reward_weights, dtype=torch.float32).unsqueeze(1)
        total = (weights * torch.nan_to_num(scores, nan=0.0)).sum(0)
        return total, scores

    # ------------------------------------------------------------------ one step
    @abc.abstractmethod
    def generate_batch(self, rows: list[dict], generator: torch.Generator) -> dict[str, Any]:
        """Sample one image per row with no grad; must return at least the final latents `x0` `(R, ...)`."""

    @abc.abstractmethod
    def compute_rl_loss(self, model, batch: dict[str, Any], backward: bool = True) -> float:
        """Back-propagate the objective on `batch` (with `advantages`) and return its value."""

    @torch.no_grad()
    def make_batch(self, rows: list[dict], generator: torch.Generator) -> dict[str, Any]:
        """Repeat each prompt row `num_generations` times, sample, decode, score, and attach the advantages."""
        args = self.args
        expanded = [row for row in rows for _ in range(args.num_generations)]
        batch = self.generate_batch(expanded, generator)
        images = self.decode(batch["x0"])
        total, scores = self.score(images, expanded)
        batch["rows"] = expanded
        batch["rewards"] = total.to(args.device)
        batch["scores"] = scores
        batch["advantages"] = group_advantages(total, args.num_generations, args.scale_rewards, args.adv_clip_max).to(
            args.device
        )
        for reward, values in zip(self.reward_funcs, scores):
            self._metrics[f"rewards/{reward.name}"].append(nanmean(values.tolist()))
        self._metrics["reward"].append(total.mean().item())
        groups = total.view(-1, args.num_generations)
        self._metrics["reward_std"].append(groups.std(dim=1, unbiased=False).mean().item())
        return batch

    def training_step(self, model, inputs: dict[str, list[dict]], num_items_in_batch=None) -> torch.Tensor:
        """Generate (every `num_iterations` optimizer steps), then back-propagate the objective once."""
        start = time.perf_counter()
        ensure_eval(model)  # `model.eval()`, without its walk over every adapter when nothing is training
        step = self.state.global_step
        if self._buffer is None or step % self.args.num_iterations == 0:
            rows = [row for task_rows in inputs.values() for row in task_rows]
            generator = self._generator("generate", step, self.accelerator.process_index)
            self._buffer = self.make_batch(rows, generator)
            self._metrics["generation_time"].append(time.perf_counter() - start)
        loss = self.compute_rl_loss(model, self._buffer)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite loss ({loss}) at optimizer step {step}; training stopped before the update, so the "
                "last checkpoint is intact."
            )
        self._metrics["step_time"].append(time.perf_counter() - start)
        return torch.tensor(loss, device=self.args.device)

    def _backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite loss ({loss.item()}) at optimizer step {self.state.global_step}; training stopped "
                "before the update, so the last checkpoint is intact."
            )
        self.accelerator.backward(loss / getattr(self, "current_gradient_accumulation_steps", 1))

    # ------------------------------------------------------------------ evaluation
    def eval_metric_names(self) -> list[str]:
        names = ["reward", *(f"rewards/{reward.name}" for reward in self.reward_funcs)]
        tasks = list(self.eval_prompts or {})
        if len(tasks) > 1:
            names += [f"rewards/{task}/{reward.name}" for task in tasks for reward in self.reward_funcs]
        return names

    @torch.no_grad()
    def compute_eval_rewards(self, prompts: Any = None, seed: int = 0, use_ema: bool = True) -> dict[str, float]:
        """Mean rewards of the student on held-out prompts, one image per prompt from the deterministic (ODE) sampler
        at the training resolution, steps and CFG, in batches of `per_device_eval_batch_size`.

        Args:
            prompts: Prompts in any form of `eval_dataset`; `None` uses `eval_dataset`.
            seed: Seed of the initial noise (the same seed, the same noise every evaluation).
            use_ema: Sample with the EMA weights when EMA is on.

        Returns:
            `reward` (the weighted total of `score`, as logged in training), `rewards/{name}` per reward function
            (the mean over the images it scores; `nan` scores left out) and, with several tasks,
            `rewards/{task}/{name}`.
        """
        prompts = self.eval_prompts if prompts is None else prompt_rows(prompts, "eval_dataset")
        if not prompts:
            raise ValueError("No evaluation prompts: pass `prompts` or an `eval_dataset`.")
        totals: list[float] = []
        scores: dict[str, list[float]] = {reward.name: [] for reward in self.reward_funcs}
        metrics: dict[str, float] = {}
        index = 0
        for task, rows in prompts.items():
            task_scores: dict[str, list[float]] = {reward.name: [] for reward in self.reward_funcs}
            for batch in self._eval_batches(rows):
                texts = [row["prompt"] for row in batch]
                # a seed per batch, so that batches do not share their initial noise
                images = self.generate(texts, seed=seed * 1_000_003 + index, use_ema=use_ema)
                index += 1
                total, batch_scores = self.score(images, batch)
                totals += total.tolist()
                for reward, values in zip(self.reward_funcs, batch_scores.tolist()):
                    task_scores[reward.name] += values
            for name, values in task_scores.items():
                scores[name] += values
                if len(prompts) > 1:
                    metrics[f"rewards/{task}/{name}"] = nanmean(values)
        metrics["reward"] = sum(totals) / len(totals)
        metrics.update({f"rewards/{name}": nanmean(values) for name, values in scores.items()})
        return metrics

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The student's rewards on held-out prompts (`compute_eval_rewards` on `eval_dataset`), logged as
        `{prefix}_reward`, `{prefix}_rewards/{name}` (and `{prefix}_rewards/{task}/{name}` with several tasks). The
        Trainer calls it every `eval_steps` with `eval_strategy="steps"` (every epoch, a pass over the largest task's
        prompts, with `"epoch"`)."""
        start = time.perf_counter()
        values = self.compute_eval_rewards(eval_dataset)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in values.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint_extras(self, folder: Path) -> None:
        step = self.state.global_step
        if self._buffer is None or step % self.args.num_iterations == 0:
            return  # the next step generates a fresh batch
        folder.mkdir(parents=True, exist_ok=True)
        try:
            save_tensor_tree(self._buffer, folder / RL_BATCH.format(process=self.accelerator.process_index))
        except TypeError as error:
            logger.warning(
                f"Checkpoint {folder} is in the middle of a `num_iterations={self.args.num_iterations}` cycle but its "
                f"generated batch cannot be stored without pickle ({error}); resuming from it regenerates the batch, "
                "so the resumed run will not match an uninterrupted one."
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        folder = Path(resume_from_checkpoint)
        batch_file = folder / RL_BATCH.format(process=self.accelerator.process_index)
        if batch_file.is_file():
            self._buffer = load_tensor_tree(batch_file, device=self.args.device)
            return
        self._buffer = None
        state_file = folder / "trainer_state.json"
        step = json.loads(state_file.read_text()).get("global_step", 0) if state_file.is_file() else 0
        if step % self.args.num_iterations:
            logger.warning(
                f"Resuming from {folder} at step {step}, in the middle of a "
                f"`num_iterations={self.args.num_iterations}` cycle, without its generated batch ({batch_file.name}): "
                "a new batch is generated, so the resumed run will not match an uninterrupted one."
            )

    # ------------------------------------------------------------------ model card
    def _reward_card_rows(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "weight": w} for r, w in zip(self.reward_funcs, self.reward_weights)]

    def _reward_summary(self) -> str:
        names = [f"`{r.name}` (weight {w:g})" for r, w in zip(self.reward_funcs, self.reward_weights)]
        plural = "s" if len(names) != 1 else ""
        return f"on the reward{plural} {', '.join(names)}"
