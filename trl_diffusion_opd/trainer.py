"""`DiffusionOPDTrainer`: multi-task on-policy distillation of reward-specific teachers into one LoRA student."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from diffusers import DiffusionPipeline
from diffusers.training_utils import EMAModel, cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from . import transition
from .config import DiffusionOPDConfig
from .data import RoundRobinPrompts, prompts_by_task
from .evaluation import DiffusersTensorBoardCallback, RewardEvalCallback
from .families.base import Cond, FlowMatchingFamily, cond_cat, cond_select, cond_tile, get_family
from .hub import create_model_card, push_checkpoint, push_to_hub
from .teachers import (
    AdapterSwitch,
    TeacherSpec,
    load_full_teacher,
    load_lora_teacher,
    lora_config_for,
    parse_teacher_spec,
    parse_teachers,
    read_lora_folder,
    resolve_teacher,
)


STUDENT = "student"
TRAINING_WEIGHTS = "student_training_weights.safetensors"
EMA_STATE = "ema_state.pt"


def default_lora_config(family: FlowMatchingFamily) -> LoraConfig:
    """The paper's student adapter: r=32, alpha=64, gaussian init, on the family's attention projections."""
    return LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=family.default_lora_targets)


class PromptCache:
    """LRU cache of prompt embeddings, so each prompt goes through the text encoders once.

    Args:
        family: Encodes missing prompts.
        max_size: Number of prompts kept.
    """

    def __init__(self, family: FlowMatchingFamily, max_size: int):
        self.family = family
        self.max_size = max_size
        self._rows: OrderedDict[str, Cond] = OrderedDict()
        self.encoders_offloaded = False

    def warm(self, prompts: list[str], batch_size: int = 32) -> bool:
        """Embed every prompt now and move the text encoders off the accelerator, if they all fit in the cache.

        Returns:
            Whether the encoders were offloaded. A prompt seen later still works: the encoders visit the
            accelerator for it and leave again.
        """
        prompts = list(dict.fromkeys(prompts))
        if len(prompts) > self.max_size:
            return False
        for start in range(0, len(prompts), batch_size):
            self(prompts[start : start + batch_size])
        for encoder in self.family.text_encoders:
            encoder.to("cpu")
        self.encoders_offloaded = True
        return True

    def _encode(self, prompts: list[str]) -> Cond:
        if not self.encoders_offloaded:
            return self.family.encode_prompts(prompts)
        device = self.family.device
        for encoder in self.family.text_encoders:
            encoder.to(device)
        try:
            return self.family.encode_prompts(prompts)
        finally:
            for encoder in self.family.text_encoders:
                encoder.to("cpu")

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, prompts: list[str]) -> Cond:
        """Conditioning with one row per prompt, in order."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        if missing:
            cond = self._encode(missing)
            for i, prompt in enumerate(missing):
                # A copy, so that evicting a prompt frees its memory rather than keeping its batch alive.
                self._rows[prompt] = {k: v[i : i + 1].clone() for k, v in cond.items()}
        rows = []
        for prompt in prompts:
            self._rows.move_to_end(prompt)
            rows.append(self._rows[prompt])
        while len(self._rows) > self.max_size:
            self._rows.popitem(last=False)
        return cond_cat(rows)


class _EMACallback(TrainerCallback):
    def __init__(self, trainer: DiffusionOPDTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None and state.global_step % args.ema_update_interval == 0:
            self.trainer.ema.step(self.trainer.student_parameters)


class DiffusionOPDTrainer(Trainer):
    """Trainer for DiffusionOPD (Li et al., 2026): on-policy distillation of several reward-specific teachers into
    one student.

    Each optimizer step is a *round* over the tasks. For every task: the student rolls out its own trajectory with no
    grad; at each trained state x_tj the task's teacher gives its transition mean μ_T; the student's mean μ_S is
    recomputed with grad at the same detached state; the loss is the closed-form per-step reverse KL
    ‖μ_S − μ_T‖² / (2σ̄_j²) (½‖μ_S − μ_T‖² for the ODE sampler). Task losses are weighted and accumulated; one
    optimizer step follows.

    Args:
        model: The base pipeline: a Hub id, a local path, or a `DiffusionPipeline` (SD3/SD3.5, FLUX.1).
        teachers: `{task: spec}`; a spec is a local folder, a Hub id (`owner/repo[/sub/folder][@revision]`), a
            dict with `path` and optional `subfolder`, `revision`, `guidance_scale`, `weight`, `name`, or a list of
            those (a weighted ensemble of teachers for that task; `name` sets the adapter name). LoRA teachers are loaded as adapters on the base.
        args: The `DiffusionOPDConfig`.
        train_dataset: Prompts: a dataset with `prompt` and `task` columns, or `{task: source}` (a `Dataset`, a list
            of prompts, a `.txt`/`.jsonl` path or a dataset id).
        eval_dataset: Held-out prompts in the same forms; `evaluate()` reports the KL to each teacher on them.
        peft_config: The student adapter; `None` uses `default_lora_config`.
        callbacks: Extra `TrainerCallback`s.
    """

    _tag_names = ["trl", "diffusion-opd", "diffusers", "lora", "text-to-image"]
    _name = "DiffusionOPD"
    _paper = {
        "title": "DiffusionOPD: On-Policy Distillation of Reward-Specific Teachers for Multi-Task Diffusion Alignment",
        "id": "2605.15055",
        "citation": (
            "@article{li2026diffusionopd,\n"
            "    title   = {{DiffusionOPD: On-Policy Distillation of Reward-Specific Teachers for Multi-Task "
            "Diffusion Alignment}},\n"
            "    author  = {Li, Quan and others},\n"
            "    journal = {arXiv preprint arXiv:2605.15055},\n"
            "    year    = {2026}\n"
            "}"
        ),
    }

    def __init__(
        self,
        model: str | DiffusionPipeline,
        teachers: dict[str, Any],
        args: DiffusionOPDConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = DiffusionOPDConfig(f"{str(name).split('/')[-1]}-DiffusionOPD")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: the prompts of each task.")

        # Everything that can be checked without a model is checked first.
        self.task_prompts = prompts_by_task(train_dataset)
        self.teacher_specs = parse_teachers(teachers, reserved=(STUDENT,))
        self._check_tasks(self.task_prompts, self.teacher_specs)
        self._teacher_by_name = {
            spec.name: (task, spec) for task, specs in self.teacher_specs.items() for spec in specs
        }
        self._check_routing(self.task_prompts)
        self.eval_prompts = prompts_by_task(eval_dataset) if eval_dataset is not None else None
        if self.eval_prompts:
            self._check_routing(self.eval_prompts)
        for task in args.task_weights or {}:
            if task not in self.teacher_specs:
                raise ValueError(f"`task_weights` names task '{task}', which has no teacher.")

        if isinstance(model, str):
            dtype = args.torch_dtype if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
            pipeline = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, revision=args.revision)
            self.base_model_id = model
        else:
            pipeline = model
            self.base_model_id = getattr(model, "name_or_path", None) or model.config.get("_name_or_path")
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.family = get_family(pipeline, max_sequence_length=args.max_sequence_length)
        transformer = pipeline.transformer
        transformer.requires_grad_(False)
        transformer.eval()  # no dropout: rollouts and recomputed means must agree
        for module in transformer.modules():
            # bitsandbytes' 4-bit layers, in eval mode on a CPU with AVX512-BF16, repack their weights on the first
            # no-grad forward (the rollout) for an inference-only kernel that the student's gradient cannot cross.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False

        for specs in self.teacher_specs.values():
            for spec in specs:
                resolve_teacher(spec, token=args.hub_token)
        self.full_teachers: dict[str, torch.nn.Module] = {}
        for specs in self.teacher_specs.values():
            for spec in specs:
                if spec.full_weight:
                    self.full_teachers[spec.name] = load_full_teacher(spec, type(transformer), transformer.dtype)
                else:
                    load_lora_teacher(transformer, spec, spec.local_dir)
        set_seed(args.seed)  # the student's random init is a function of the seed
        self.peft_config = self._add_student(transformer, peft_config, args)
        self.adapters = AdapterSwitch(transformer, STUDENT)
        self.adapters.activate(STUDENT)

        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            # diffusers models have no `activation_checkpointing_enable` / `gradient_checkpointing_enable`, which the
            # Trainer would call (transformers 5 reads `activation_checkpointing`; `gradient_checkpointing` is its
            # alias): enable diffusers' own and keep the Trainer from trying.
            transformer.enable_gradient_checkpointing()
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False

        super().__init__(
            model=transformer,
            args=args,
            train_dataset=RoundRobinPrompts(self.task_prompts, 1, 1, args.seed),  # replaced in get_train_dataloader
            callbacks=callbacks,
        )
        self._metrics: dict[str, list[float]] = defaultdict(list)
        device = self.args.device
        for encoder in self.family.text_encoders:
            encoder.to(device)
        for module in self.full_teachers.values():
            # With offload, full teachers wait on the CPU and visit the accelerator one at a time.
            module.to("cpu" if args.teacher_offload else device)
        self.prompt_cache = PromptCache(self.family, args.prompt_cache_size)
        if args.offload_text_encoders:
            every = [row["prompt"] for rows in self.task_prompts.values() for row in rows]
            every += [row["prompt"] for rows in (self.eval_prompts or {}).values() for row in rows]
            self.prompt_cache.warm([args.negative_prompt, *every])
        self.ema = (
            EMAModel(self.student_parameters, decay=args.ema_decay, min_decay=args.ema_decay, foreach=False)
            if args.ema
            else None
        )
        if self.ema is not None:
            self.ema.to(device)
            self.add_callback(_EMACallback(self))
        if self.pop_callback(TensorBoardCallback) is not None:  # diffusers configs have no to_json_string
            self.add_callback(DiffusersTensorBoardCallback)
        for callback in self.callback_handler.callbacks:  # users may pass callbacks=[RewardEvalCallback(...)]
            if isinstance(callback, RewardEvalCallback) and callback.trainer is None:
                callback.bind(self)
        if args.eval_rewards is not None:
            self.add_callback(RewardEvalCallback(self, rewards=args.eval_rewards))
        self.model_accepts_loss_kwargs = False
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_tasks(prompts: dict[str, list], teachers: dict[str, list[TeacherSpec]]) -> None:
        no_teacher = [task for task in prompts if task not in teachers]
        if no_teacher:
            raise ValueError(f"Dataset task(s) {no_teacher} have no teacher; teachers are given for {list(teachers)}.")
        no_prompts = [task for task in teachers if task not in prompts]
        if no_prompts:
            raise ValueError(f"Teacher task(s) {no_prompts} have no prompts in the dataset (tasks: {list(prompts)}).")

    def _check_routing(self, prompts: dict[str, list[dict]]) -> None:
        for task, rows in prompts.items():
            for index, row in enumerate(rows):
                names = row.get("teachers")
                if not names:
                    continue
                names = [names] if isinstance(names, str) else list(names)
                unknown = [n for n in names if n not in self._teacher_by_name]
                if unknown:
                    raise ValueError(
                        f"Task '{task}' row {index} ({row['prompt']!r}) routes to unknown teacher(s) {unknown}; "
                        f"teachers are {sorted(self._teacher_by_name)}."
                    )

    def _add_student(self, transformer, peft_config: LoraConfig | None, args: DiffusionOPDConfig) -> LoraConfig:
        if args.student_adapter is not None:
            spec = parse_teacher_spec(STUDENT, args.student_adapter)
            state_dict, config = read_lora_folder(resolve_teacher(spec), spec.weight_name)
            peft_config = lora_config_for(state_dict, config)
            transformer.add_adapter(peft_config, adapter_name=STUDENT)
            set_peft_model_state_dict(transformer, state_dict, adapter_name=STUDENT)
        else:
            peft_config = copy.deepcopy(peft_config) if peft_config is not None else default_lora_config(self.family)
            transformer.add_adapter(peft_config, adapter_name=STUDENT)
        for name, param in transformer.named_parameters():
            param.requires_grad_(f".{STUDENT}." in name)
        # LoRA weights train in float32 even on a bf16/fp16 base.
        cast_training_params(transformer, torch.float32)
        return peft_config

    @property
    def student_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if f".{STUDENT}." in n]

    def create_optimizer(self, model=None):
        # The optimizer holds the student only: peft's set_adapter can flip teachers to trainable.
        trainable = {id(p) for p in self.student_parameters}
        for name, param in (model or self.model).named_parameters():
            if param.requires_grad and id(param) not in trainable:
                raise RuntimeError(f"Parameter {name} is trainable but is not part of the student adapter.")
        return super().create_optimizer(model)

    def get_train_dataloader(self) -> DataLoader:
        rounds = RoundRobinPrompts(
            self.task_prompts, self.args.per_device_train_batch_size, self.accelerator.num_processes, self.args.seed
        )
        loader = DataLoader(rounds, batch_size=1, sampler=SequentialSampler(rounds), collate_fn=lambda items: items[0])
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------ one round
    def _generator(self, *keys: Any) -> torch.Generator:
        """A generator seeded by (seed, keys): rollouts are a function of the step, so resuming is exact."""
        digest = hashlib.sha256(repr((self.args.seed, *keys)).encode()).digest()
        seed = int.from_bytes(digest[:8], "little") % (2**63)
        return torch.Generator(device="cpu").manual_seed(seed)

    def _negative(self, batch: int) -> Cond:
        return cond_tile(self.prompt_cache([self.args.negative_prompt]), batch)

    @torch.no_grad()
    def rollout(self, cond: Cond, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Sample the student's trajectory with no grad.

        Returns:
            `states` `(N + 1, B, ...)` float32 (x_{t_0}..x_{t_N}), `sigmas` `(N + 1,)`, and for stochastic samplers
            `log_probs` `(N, B)` of the sampled transitions (used by the PPO-style loss).
        """
        args = self.args
        batch = next(iter(cond.values())).shape[0]
        sigmas = self.family.sigmas(args.num_inference_steps, args.resolution)
        x = self.family.init_latents(batch, args.resolution, generator).to(args.device)
        negative = self._negative(batch) if args.guidance_scale > 1 else None
        states, log_probs = [x], []
        transformer = self.accelerator.unwrap_model(self.model)
        t_guard = sigmas[1].item()
        for j in range(args.num_inference_steps):
            sigma = sigmas[j].expand(batch).to(args.device)
            v = self.family.velocity(transformer, x, sigma, cond, args.guidance_scale, negative)
            noise = torch.randn(x.shape, generator=generator).to(x.device) if args.noise_level > 0 else None
            x, mean, std = transition.sample_step(
                x, v, sigmas[j].item(), sigmas[j + 1].item(), args.noise_level, args.sde_type, t_guard, noise=noise
            )
            if args.noise_level > 0:
                log_probs.append(transition.gaussian_log_prob(x, mean, std))
            states.append(x)
        out = {"states": torch.stack(states), "sigmas": sigmas}
        if log_probs:
            out["log_probs"] = torch.stack(log_probs)
        return out

    def _step_rows(self, rollout: dict[str, torch.Tensor], steps: range):
        """Rows for a chunk of trained steps: states, sigma, next sigma, all `(len(steps) * B, ...)`."""
        states = rollout["states"]
        batch = states.shape[1]
        x = states[steps.start : steps.stop].flatten(0, 1)
        sigmas = rollout["sigmas"].to(x.device)
        t = sigmas[steps.start : steps.stop].repeat_interleave(batch)
        t_next = sigmas[steps.start + 1 : steps.stop + 1].repeat_interleave(batch)
        return x, t, t_next

    def _mean(self, transformer, x, t, t_next, cond, guidance_scale, negative, t_guard) -> torch.Tensor:
        v = self.family.velocity(transformer, x, t, cond, guidance_scale, negative)
        return transition.step_mean(x, v, t, t_next, self.args.noise_level, self.args.sde_type, t_guard)

    @torch.no_grad()
    def teacher_means(self, spec: TeacherSpec, task: str, x, t, t_next, cond: Cond, t_guard: float) -> torch.Tensor:
        """Transition means of teacher `spec` at states `x` `(R, ...)` with its own CFG, no grad, float32.

        `task` is the task whose default teacher guidance applies when the spec sets none.
        """
        guidance = spec.guidance_scale if spec.guidance_scale is not None else self.args.teacher_guidance_for(task)
        negative = self._negative(x.shape[0]) if guidance > 1 else None
        if spec.name in self.full_teachers:
            with self._on_device(self.full_teachers[spec.name]) as module:
                return self._mean(module, x, t, t_next, cond, guidance, negative, t_guard)
        transformer = self.accelerator.unwrap_model(self.model)
        with self.adapters.use(spec.name):
            return self._mean(transformer, x, t, t_next, cond, guidance, negative, t_guard)

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module):
        """Move an offloaded full teacher to the accelerator for one call, and back."""
        if not self.args.teacher_offload:
            yield module
            return
        module.to(self.args.device)
        try:
            yield module
        finally:
            module.to("cpu")

    def _chunks(self, num_steps: int):
        size = self.args.step_batch_size or num_steps
        return [range(s, min(s + size, num_steps)) for s in range(0, num_steps, size)]

    def _routing(self, task: str, rows: list[dict]) -> tuple[list[tuple[str, TeacherSpec]], torch.Tensor]:
        """Which teachers supervise each row, and with which weight.

        A row is supervised by its task's teachers, or by the teachers its `teachers` field names (routing by
        metadata). Returns the teachers used, as `(owner task, spec)`, and weights `(B, K)` normalised per row.
        """
        used: dict[str, tuple[str, TeacherSpec]] = {}
        per_row = []
        for row in rows:
            names = row.get("teachers")
            if names:
                chosen = [self._teacher_by_name[n] for n in ([names] if isinstance(names, str) else names)]
            else:
                chosen = [(task, spec) for spec in self.teacher_specs[task]]
            per_row.append({spec.name for _, spec in chosen})
            for owner, spec in chosen:
                used.setdefault(spec.name, (owner, spec))
        teachers = list(used.values())
        weights = torch.tensor(
            [[spec.weight if spec.name in names else 0.0 for _, spec in teachers] for names in per_row]
        )
        return teachers, weights / weights.sum(1, keepdim=True)

    def task_loss(
        self, model, task: str, rows: list[dict], generator: torch.Generator, backward: bool
    ) -> tuple[float, torch.Tensor]:
        """Roll out, supervise and (optionally) back-propagate one task's loss.

        Each teacher's means are computed only on the rows it supervises; a row's loss is the weighted mean of its
        teachers' per-step KLs (PPO-style surrogates with `loss_type="ppo"`).

        Returns:
            `(loss, kl_per_step)`: the task's weighted loss (a float) and the unweighted KL per trained step `(T,)`.
        """
        args = self.args
        cond = self.prompt_cache([row["prompt"] for row in rows])
        batch = len(rows)
        rollout = self.rollout(cond, generator)
        num_steps = args.num_train_timesteps
        t_guard = rollout["sigmas"][1].item()
        task_weight = float((args.task_weights or {}).get(task, 1.0))
        teachers, weights = self._routing(task, rows)
        kl_per_step = torch.zeros(num_steps, device=args.device)
        loss_value = 0.0
        for steps in self._chunks(num_steps):
            x, t, t_next = self._step_rows(rollout, steps)
            rows_cond = cond_tile(cond, len(steps))
            row_weights = weights.repeat(len(steps), 1).to(x.device)  # rows are step-major, like x
            subsets = [row_weights[:, k].nonzero().squeeze(1) for k in range(len(teachers))]
            targets = [
                self.teacher_means(spec, owner, x[idx], t[idx], t_next[idx], cond_select(rows_cond, idx), t_guard)
                for (owner, spec), idx in zip(teachers, subsets)
            ]
            with self.compute_loss_context_manager():
                negative = self._negative(x.shape[0]) if args.guidance_scale > 1 else None
                student = self._mean(model, x, t, t_next, rows_cond, args.guidance_scale, negative, t_guard)
                kl = torch.zeros(x.shape[0], device=x.device)
                objective = torch.zeros(x.shape[0], device=x.device)
                for k, ((_, spec), idx, target) in enumerate(zip(teachers, subsets, targets)):
                    kl_k = transition.closed_form_kl(
                        student[idx],
                        target,
                        t[idx],
                        t_next[idx],
                        args.noise_level,
                        args.sde_type,
                        args.kl_normalization,
                        t_guard,
                    )
                    kl = kl.index_add(0, idx, row_weights[idx, k] * kl_k)
                    if args.loss_type == "ppo":
                        kl_k = self._ppo_rows(rollout, steps, idx, student[idx], target, t[idx], t_next[idx], t_guard)
                    objective = objective.index_add(0, idx, row_weights[idx, k] * kl_k)
                    if backward and len(teachers) > 1:  # an ensemble or routed rows: each teacher's share
                        self._metrics[f"kl/{task}/{spec.name}"].append(kl_k.detach().mean().item())
                # mean over (steps, prompts) of the whole task, chunk by chunk
                loss = task_weight * objective.sum() / (num_steps * batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Non-finite loss ({loss.item()}) for task '{task}' at optimizer step {self.state.global_step}; "
                    "training stopped before the update, so the last checkpoint is intact."
                )
            if backward:
                self.accelerator.backward(loss / getattr(self, "current_gradient_accumulation_steps", 1))
            loss_value += loss.item()
            kl_per_step[steps.start : steps.stop] = kl.detach().view(len(steps), batch).mean(1)
        return loss_value, kl_per_step

    def _ppo_rows(self, rollout, steps, idx, student, target, t, t_next, t_guard) -> torch.Tensor:
        args = self.args
        sample = rollout["states"][steps.start + 1 : steps.stop + 1].flatten(0, 1)[idx]
        std = transition.step_std(t, t_next, args.noise_level, args.sde_type, t_guard)
        old = student.detach()  # on-policy: the rollout policy is the current student
        return transition.ppo_surrogate_loss(sample, student, old, target, std, args.ppo_clip_range)

    def training_step(self, model, inputs: dict[str, list[dict]], num_items_in_batch=None) -> torch.Tensor:
        """One round: every task in order, losses accumulated, one optimizer step afterwards (by the Trainer)."""
        start = time.perf_counter()
        model.eval()
        step = self.state.global_step
        rank = self.accelerator.process_index
        tasks = list(inputs)
        total = 0.0
        kl_steps = []
        for index, task in enumerate(tasks):
            # DDP all-reduces once, on the last task's backward.
            last = index == len(tasks) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync:
                loss, kl_per_step = self.task_loss(model, task, inputs[task], self._generator(step, rank, task), True)
            total += loss
            kl_steps.append(kl_per_step)
            self._metrics[f"kl/{task}"].append(kl_per_step.mean().item())
            self._metrics[f"loss/{task}"].append(loss)
        for j, value in enumerate(torch.stack(kl_steps).mean(0).tolist()):
            self._metrics[f"kl_step/{j}"].append(value)
        self._metrics["round_time"].append(time.perf_counter() - start)
        return torch.tensor(total, device=self.args.device)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def compute_teacher_kl(
        self, prompts: dict[str, list[str] | list[dict]] | None = None, seed: int = 0, use_ema: bool = True
    ) -> dict[str, float]:
        """Mean per-step KL between the student and each task's teacher on fresh student rollouts.

        Args:
            prompts: `{task: prompts}`; `None` uses `eval_dataset`.
            seed: Seed of the rollouts (same seed, same initial noise).
            use_ema: Evaluate the EMA weights when EMA is on.

        Returns:
            `{task: kl}` with the configured normalisation.
        """
        prompts = self.eval_prompts if prompts is None else prompts_by_task(prompts)
        if not prompts:
            raise ValueError("No evaluation prompts: pass `prompts` or an `eval_dataset`.")
        model = self.accelerator.unwrap_model(self.model)
        context = self._ema_weights() if use_ema else contextlib.nullcontext()
        result = {}
        with context:
            for task, rows in prompts.items():
                if task not in self.teacher_specs:
                    raise ValueError(f"Evaluation task '{task}' has no teacher.")
                rows = [{"prompt": r} if isinstance(r, str) else r for r in rows]
                _, kl = self.task_loss(model, task, rows, self._generator("eval", seed, task), backward=False)
                result[task] = kl.mean().item()
        return result

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        adapter: str | None = STUDENT,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        use_ema: bool = True,
    ) -> list:
        """Sample images with the deterministic ODE sampler, with the student (EMA weights when EMA is on), a
        teacher (its adapter name) or the base (`adapter=None`).

        Returns:
            One PIL image per prompt, `resolution` pixels square. The same seed gives the same initial noise for
            every adapter, so images are comparable side by side.
        """
        args = self.args
        steps = num_inference_steps or args.num_inference_steps
        if guidance_scale is None:
            task = next((t for t, specs in self.teacher_specs.items() for s in specs if s.name == adapter), None)
            guidance_scale = self.args.teacher_guidance_for(task) if task else args.guidance_scale
        cond = self.prompt_cache(prompts)
        negative = self._negative(len(prompts)) if guidance_scale > 1 else None
        sigmas = self.family.sigmas(steps, args.resolution)
        x = self.family.init_latents(len(prompts), args.resolution, self._generator("generate", seed)).to(args.device)
        transformer = self.accelerator.unwrap_model(self.model)
        context = self._ema_weights() if use_ema and adapter == STUDENT else contextlib.nullcontext()
        with context, self.adapters.use(adapter):
            for j in range(steps):
                sigma = sigmas[j].expand(len(prompts)).to(args.device)
                v = self.family.velocity(transformer, x, sigma, cond, guidance_scale, negative)
                x = transition.step_mean(x, v, sigmas[j].item(), sigmas[j + 1].item())
        vae = self.pipeline.vae
        home = vae.device
        vae.to(args.device)
        images = self.family.decode(x, args.resolution)
        vae.to(home)  # training never needs the VAE, so it may live off the accelerator
        return images

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """KL to each teacher on held-out prompts, logged as `{prefix}_kl/{task}`."""
        prompts = prompts_by_task(eval_dataset) if eval_dataset is not None else None
        kl = self.compute_teacher_kl(prompts)
        metrics = {f"{metric_key_prefix}_kl/{task}": value for task, value in kl.items()}
        metrics[f"{metric_key_prefix}_kl"] = sum(kl.values()) / len(kl)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        params = self.student_parameters
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_eval = any(key.startswith("eval") for key in logs)
        if not is_eval and self._metrics:
            logs = {**logs, **{key: sum(values) / len(values) for key, values in self._metrics.items() if values}}
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving and resuming
    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student LoRA in PEFT naming (`...attn.to_q.lora_A.weight`), on CPU."""
        model = self.accelerator.unwrap_model(self.model)
        state = get_peft_model_state_dict(model, adapter_name=STUDENT)
        # A copy: on CPU `.cpu()` would alias the live parameters, which the EMA context restores afterwards.
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def save_student_lora(self, output_dir: str | os.PathLike, use_ema: bool = True) -> None:
        """Write the student adapter in diffusers' LoRA format (`pytorch_lora_weights.safetensors`) with its adapter
        metadata, loadable by `pipe.load_lora_weights(output_dir)`."""
        with self._ema_weights() if use_ema else contextlib.nullcontext():
            state = self.student_state_dict()
        self.family.pipeline_class.save_lora_weights(
            output_dir,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=self.peft_config.to_dict(),
            is_main_process=self.accelerator.is_main_process,
        )

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.save_student_lora(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            # The exported adapter holds the EMA weights; resuming needs the raw training weights too.
            save_file(self.student_state_dict(), str(folder / TRAINING_WEIGHTS))
            if self.ema is not None:
                torch.save(self.ema.state_dict(), folder / EMA_STATE)
            self.create_model_card(output_dir=str(folder))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        folder = Path(resume_from_checkpoint)
        if not (folder / TRAINING_WEIGHTS).is_file():
            raise ValueError(f"{folder} is not a DiffusionOPD checkpoint (no {TRAINING_WEIGHTS}).")
        model = self.accelerator.unwrap_model(model or self.model)
        state = load_file(str(folder / TRAINING_WEIGHTS))
        result = set_peft_model_state_dict(model, state, adapter_name=STUDENT)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"Checkpoint {folder} does not match the student adapter: {result.unexpected_keys[:3]}")
        if self.ema is not None and (folder / EMA_STATE).is_file():
            self.ema.load_state_dict(torch.load(folder / EMA_STATE, weights_only=False))
            self.ema.to(self.args.device)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        **kwargs,
    ) -> None:
        """Write `README.md`, the Hub model card, next to the adapter (in `output_dir`, default `args.output_dir`).

        Args:
            model_name: Title of the card.
            dataset_name: Hub dataset id(s) of the prompts, recorded in the metadata.
            tags: Extra tags.
            output_dir: Folder to write to (the trainer writes one into every checkpoint too).
        """
        if not self.is_world_process_zero():
            return
        card = create_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, **kwargs)
        card.save(os.path.join(output_dir or self.args.output_dir, "README.md"))

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Upload the student adapter (`pytorch_lora_weights.safetensors`), its model card and `samples/*.png` to
        `args.hub_model_id`; never the base, the teachers or the optimizer state.

        Args:
            commit_message: Message of the commit.
            blocking: Wait for the upload; `False` returns a `Future`.
            token: Token with write access; defaults to `args.hub_token`.
            revision: Branch to push to; defaults to `args.hub_revision`.
            private: Visibility of a newly created repo; defaults to `args.hub_private_repo`.
            kwargs: `model_name`, `dataset_name`, `tags` for the model card.

        Returns:
            The `CommitInfo` of the upload, or a `Future` with `blocking=False`.
        """
        return push_to_hub(
            self,
            commit_message=commit_message,
            blocking=blocking,
            token=token,
            revision=revision,
            private=private,
            **kwargs,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer's default uploads the whole output folder; only the adapter, card and samples belong there.
        push_checkpoint(self, checkpoint_folder)

    def train(self, *args, **kwargs):
        set_seed(self.args.seed)
        return super().train(*args, **kwargs)
