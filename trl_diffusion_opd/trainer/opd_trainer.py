"""`DiffusionOPDTrainer`: multi-task on-policy distillation of reward-specific teachers into one LoRA student."""

from __future__ import annotations

import collections
import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from torch.utils.data import DataLoader, SequentialSampler
from transformers import TrainerCallback
from transformers.utils import logging

from .. import transition
from ..data import MixedTaskPrompts, prompts_by_task, row_images
from ..families.base import Cond, cond_select, cond_tile
from ..hub import teacher_reference
from ..lora_io import DIFFUSERS_LORA_WEIGHTS, expert_weight_name, has_expert_lora
from ..teacher_bank import TeacherBank
from ..teachers import (
    BUILT_TEACHERS_DIR,
    STUDENT,
    TeacherSpec,
    build_teacher,
    check_teacher_files,
    load_full_teacher,
    parse_teacher_spec,
    parse_teachers,
    resolve_teacher,
)
from .base_trainer import DiffusionLoRATrainer, choose_step_batch_size, free_memory_bytes, to_device
from .module_walks import ensure_eval
from .opd_config import DiffusionOPDConfig
from .rollout import Guidance, RolloutState


logger = logging.get_logger(__name__)

# The fields of `DiffusionOPDConfig` that may be a `{task: value}` dict.
TASK_FIELDS = (
    "task_weights",
    "task_timestep_fraction",
    "task_prompt_templates",
    "teacher_guidance_scale",
    "teacher_guidance_scale_2",
    "eval_rewards",
)


class DiffusionOPDTrainer(DiffusionLoRATrainer):
    """Trainer for DiffusionOPD (Li et al., 2026): on-policy distillation of several reward-specific teachers into
    one student.

    Each optimizer step is a *round* over the tasks. For every task: the student rolls out its own trajectory with no
    grad; at each trained state x_tj the task's teacher gives its transition mean μ_T; the student's mean μ_S is
    recomputed with grad at the same detached state (with `fused_rollout`, the default, the rollout's own forward at
    the trained steps is that pass, so it is not run twice); the loss is the closed-form per-step reverse KL
    ‖μ_S − μ_T‖² / (2σ̄_j²) (½‖μ_S − μ_T‖² for the ODE sampler). Task losses are weighted and accumulated; one
    optimizer step follows.

    Args:
        model: The base pipeline: a Hub id, a local path, or a `DiffusionPipeline` of a supported model family.
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

    _tag_names = ["trl", "diffusion-opd", "diffusers", "lora"]
    _name = "DiffusionOPD"
    _uses_input_images = True
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
        self.check_tasks(self.task_prompts, self.teacher_specs)
        self._teacher_by_name = {
            spec.name: (task, spec) for task, specs in self.teacher_specs.items() for spec in specs
        }
        self._check_routing(self.task_prompts)
        self.eval_prompts = prompts_by_task(eval_dataset) if eval_dataset is not None else None
        if self.eval_prompts:
            self.check_eval_tasks(self.eval_prompts, self.teacher_specs)
            self._check_routing(self.eval_prompts)
        self.check_task_fields(args, self.teacher_specs)
        self.anchor_spec = self._parse_anchor(args)
        # The teachers' files are read (headers only) before the base model is loaded or anything computed; those
        # made for the base (`toy:<seed>`) are written once it is loaded (`_load_extra_models`).
        for spec in self._loaded_specs():
            if not spec.needs_base:
                resolve_teacher(spec, token=args.hub_token)
                check_teacher_files(spec)

        self.full_teachers: dict[str, torch.nn.Module] = {}
        super().__init__(model, args, peft_config=peft_config, callbacks=callbacks)
        if args.query_mode == "single":
            empty = [task for task in self.teacher_specs if not self.query_steps(task)]
            if empty:
                low, high = args.query_sigma_bounds
                levels = [round(float(v), 3) for v in self.family.sigmas(args.num_inference_steps, args.resolution)]
                raise ValueError(
                    f"`query_sigma_range` [{low}, {high}] holds none of the trained states of task(s) {empty} "
                    f"(noise levels {levels}, the last one not trained); widen it."
                )

    # ------------------------------------------------------------------ hooks
    def student_prompts(self, task: str | None, prompts: list[str]) -> list[str]:
        return [self.args.student_prompt(task, prompt) for prompt in prompts] if task else list(prompts)

    def _load_extra_models(self, transformer, args: DiffusionOPDConfig) -> None:
        """Load every teacher (resolved in `__init__`): LoRA teachers as adapters on the base, full ones as frozen
        modules.

        With several experts (Wan 2.2), a LoRA teacher's file for each expert (`expert_weight_name`) goes on that
        expert; a teacher with files for some experts only supervises only the steps those experts run.
        """
        experts = self.family.experts
        # LoRA teachers are flat tensors behind shared slot adapters, host-resident with a device budget
        bank = TeacherBank(args.max_teachers_on_device)
        for specs in [self._loaded_specs()]:
            for spec in specs:
                if spec.needs_base:  # the resolution was checked against the base first: a failed start writes nothing
                    with args.main_process_first(desc="writing the teachers made for the base"):
                        build_teacher(spec, self.pipeline, Path(args.output_dir) / BUILT_TEACHERS_DIR)
                if spec.full_weight and len(experts) > 1:
                    raise ValueError(
                        f"Teacher '{spec.name}': full-weight teachers of multi-expert pipelines are not supported; "
                        "give LoRA teachers (one file per expert)."
                    )
                if spec.full_weight:
                    self.full_teachers[spec.name] = load_full_teacher(spec, type(transformer), transformer.dtype)
                    spec.experts = tuple(experts)
                    continue
                if len(experts) == 1:
                    bank.load(transformer, spec)
                    spec.experts = tuple(experts)
                    continue
                found = [e for e in experts if has_expert_lora(spec.local_dir, e, spec.weight_name)]
                if not found:
                    names = [expert_weight_name(e, spec.weight_name) or DIFFUSERS_LORA_WEIGHTS for e in experts]
                    raise ValueError(f"Teacher '{spec.name}' ({spec.display}) has none of the expert LoRAs {names}.")
                for expert in found:
                    bank.load(
                        experts[expert],
                        spec,
                        weight_name=expert_weight_name(expert, spec.weight_name),
                        prefix=f"{expert}.",  # the denoiser's naming, as the student's keys
                    )
                spec.experts = tuple(found)
        if self._base_anchor is not None:  # the base covers every expert
            self._base_anchor.experts = tuple(experts)
        # the slots' weights leave the parameters before the student is added and the Trainer places the model
        bank.finalize()
        self.teacher_bank = bank

    def _place_models(self, device) -> None:
        self.teacher_bank.to(device)
        self.adapters.bank = self.teacher_bank
        for module in self.full_teachers.values():
            # With offload, full teachers wait on the CPU and visit the accelerator one at a time.
            module.to("cpu" if self.args.teacher_offload else device)
            if self.args.teacher_offload and torch.device(device).type == "cuda":
                # in pinned memory, so that each visit is an asynchronous copy (`to_device`)
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensor.data = tensor.data.pin_memory()

    def adapter_state_dict(self, adapter: str = STUDENT) -> dict[str, torch.Tensor]:
        """An adapter's LoRA weights in PEFT naming, copied to the CPU; a LoRA teacher's by its name (from the
        `teacher_bank`, keyed as the student's)."""
        if adapter in self.teacher_bank:
            return {k: v.detach().to("cpu", copy=True) for k, v in self.teacher_bank.weights(adapter).items()}
        return super().adapter_state_dict(adapter)

    def _default_guidance(self, adapter: str | None) -> float:
        task = next((t for t, specs in self.teacher_specs.items() for s in specs if s.name == adapter), None)
        return self.args.teacher_guidance_for(task) if task else self.args.guidance_scale

    def _model_card_details(self) -> dict[str, Any]:
        args = self.args
        tasks = list(self.teacher_specs)
        kinds = self.task_kinds()
        teachers = [
            {
                "task": task,
                "kind": kinds[task] if any(kind != self.family.text_task_kind for kind in kinds.values()) else None,
                "reference": teacher_reference(spec),
                "guidance_scale": spec.guidance_scale
                if spec.guidance_scale is not None
                else args.teacher_guidance_for(task),
                "weight": spec.weight,
            }
            for task, specs in self.teacher_specs.items()
            for spec in specs
        ]
        count = len(teachers)
        summary = (
            f"distilled with\n**DiffusionOPD** ([{self._paper['title']}](https://arxiv.org/abs/"
            f"{self._paper['id']})): on-policy distillation of\n{count} reward-specific teacher"
            f"{'s' if count != 1 else ''} ({', '.join(tasks)}) into one student.\n"
            "The student samples its own trajectories and, at every trained step, is pulled towards the transition "
            "of the teacher\nof the prompt's task by a closed-form per-step KL, so one adapter learns all the tasks "
            "at once."
        )
        settings = {
            "loss": "closed-form per-step KL" if args.loss_type == "kl" else "PPO-style surrogate",
            "KL normalisation": args.kl_normalization,
            "prompts per task, device and round": args.per_device_train_batch_size,
        }
        for task, template in (args.task_prompt_templates or {}).items():
            settings[f"student prompt for {task}"] = f"`{template}`"
        for task in args.task_timestep_fraction or {}:
            steps = args.train_timesteps_for(task)
            settings[f"steps supervised for {task}"] = f"the first {steps} of {args.num_inference_steps}"
        summary += self._scale_card_notes(settings)
        return {
            "summary": summary,
            "teachers": teachers,
            "tags": tasks,
            "settings": settings,
            "steps_label": "rounds (optimizer steps)",
            "papers": [self._paper],
        }

    def task_kinds(self) -> dict[str, str]:
        """Each task's kind, from its training rows and the family's names for them: e.g. `"editing"` (every row has
        input images), `"text-to-image"` (none has), `"text-to-image + editing"` (both); a video family says
        `"text-to-video"` / `"image-to-video"`."""
        text, image = self.family.text_task_kind, self.family.image_task_kind
        kinds = {}
        for task, rows in self.task_prompts.items():
            edits = sum(bool(row.get("image")) for row in rows)
            kinds[task] = image if edits == len(rows) else f"{text} + {image}" if edits else text
        return kinds

    def _scale_card_notes(self, settings: dict[str, Any]) -> str:
        """Settings rows (added to `settings`) and summary sentences for the round and query options."""
        args = self.args
        notes = ""
        if args.tasks_per_round is not None:
            rows = args.rows_per_round or args.per_device_train_batch_size * args.tasks_per_round
            settings["round"] = (
                f"mixed-task: {args.tasks_per_round} task draw(s) ({args.task_sampling}), {rows} rows per device"
            )
        if args.query_mode == "single":
            low, high = args.query_sigma_bounds
            settings["teacher queries"] = f"one state per trajectory, sigma in [{low}, {high}], velocity MSE"
        if self.anchor_spec is not None:
            source = "the base" if self.anchor_spec is self._base_anchor else f"`{self.anchor_spec.display}`"
            settings["anchor teacher"] = (
                f"{source} (guidance {self.anchor_spec.guidance_scale:g}), weight {args.anchor_weight} in every row"
            )
        if args.guidance_free_student:
            settings["student CFG"] = "none: the teachers' CFG is distilled into the adapter"
            notes += (
                "\n\nThe teachers ran with classifier-free guidance and the student without: the guidance is in the "
                "adapter, so sample it with `guidance_scale=1.0` (no CFG, one transformer pass per step), as the "
                "quick start does; CFG on top of it guides twice."
            )
        return notes

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def check_tasks(prompts: dict[str, list], teachers: dict[str, Any]) -> None:
        """Every task of the training prompts has a teacher, and every teacher's task has prompts."""
        no_teacher = [task for task in prompts if task not in teachers]
        if no_teacher:
            raise ValueError(f"Dataset task(s) {no_teacher} have no teacher; teachers are given for {list(teachers)}.")
        no_prompts = [task for task in teachers if task not in prompts]
        if no_prompts:
            raise ValueError(f"Teacher task(s) {no_prompts} have no prompts in the dataset (tasks: {list(prompts)}).")

    @staticmethod
    def check_eval_tasks(eval_prompts: dict[str, list], teachers: dict[str, Any]) -> None:
        """Held-out prompts measure the KL to their task's teacher: every task of `eval_prompts` needs one."""
        no_teacher = [task for task in eval_prompts if task not in teachers]
        if no_teacher:
            raise ValueError(
                f"`eval_prompts` task(s) {no_teacher} have no teacher; teachers are given for {list(teachers)}."
            )

    @staticmethod
    def check_task_fields(args: DiffusionOPDConfig, teachers: dict[str, Any]) -> None:
        """Every per-task dict of `args` (`TASK_FIELDS`) names only tasks with a teacher, since an entry for another
        task would be ignored without a word (a typo), and `task_weights` leaves some task a weight > 0 (missing
        tasks weigh 1)."""
        for name in TASK_FIELDS:
            value = getattr(args, name, None)
            unknown = [task for task in value if task not in teachers] if isinstance(value, dict) else []
            if unknown:
                raise ValueError(
                    f"`{name}` names task(s) {unknown}, which have no teacher; teachers are given for {list(teachers)}."
                )
        task_weights = args.task_weights or {}
        if not any(task_weights.get(task, 1.0) > 0 for task in teachers):
            raise ValueError(f"`task_weights` gives every task weight 0 ({task_weights}): nothing would be trained.")

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

    def _parse_anchor(self, args: DiffusionOPDConfig) -> TeacherSpec | None:
        """The `anchor_teacher` as a spec: `base` (the base with adapters off), or a teacher spec named `anchor`.
        Its CFG is its own `guidance_scale`, else `teacher_guidance_scale` when that is one number, else
        `guidance_scale`."""
        value = args.anchor_teacher
        self._base_anchor = None
        if value is None:
            return None
        is_base = value == "base" or (isinstance(value, dict) and value.get("path") == "base")
        name = "base" if is_base else "anchor"
        if name in self._teacher_by_name:
            raise ValueError(f"`anchor_teacher` is named '{name}', which a teacher's name already is; rename it.")
        if is_base:
            unknown = sorted(set(value) - {"path", "guidance_scale"}) if isinstance(value, dict) else []
            if unknown:
                raise ValueError(f"`anchor_teacher` 'base' takes only `guidance_scale`, got {unknown}.")
            spec = TeacherSpec(name=name, path="base")
            spec.guidance_scale = value.get("guidance_scale") if isinstance(value, dict) else None
            self._base_anchor = spec
        else:
            spec = parse_teacher_spec(name, value)
        if spec.guidance_scale is None:
            teacher_scale = args.teacher_guidance_scale
            spec.guidance_scale = float(
                teacher_scale if isinstance(teacher_scale, (int, float)) else args.guidance_scale
            )
        return spec

    def _loaded_specs(self) -> list[TeacherSpec]:
        """Every teacher with weights of its own: the tasks' teachers and a non-base anchor."""
        specs = [spec for specs in self.teacher_specs.values() for spec in specs]
        if self.anchor_spec is not None and self.anchor_spec is not self._base_anchor:
            specs.append(self.anchor_spec)
        return specs

    # ------------------------------------------------------------------ one round
    def _mean(self, transformer, x, t, t_next, cond, guidance: Guidance, t_guard) -> torch.Tensor:
        v = self._velocity(transformer, x, t, cond, guidance)
        return transition.step_mean(x, v, t, t_next, self.args.noise_level, self.args.sde_type, t_guard)

    def _fused_rollout_step(
        self,
        model,
        rollout: RolloutState,
        steps: range,
        teachers: list[tuple[str, TeacherSpec]],
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Advance a fused rollout (kept states) through the trained steps `steps` and return the student's means there.

        The forward that draws x_{j+1} = μ_S(x_j) (+ noise) is the student's trained pass: it runs with grad (through
        `model`, so DDP / FSDP see it) and μ_S keeps its graph, while x_{j+1} is detached, exactly as the two-pass
        loop's recomputation at the detached rollout states. A step that no teacher supervises (an expert no teacher
        has a LoRA for) runs without grad, so that expert gets no gradient. The graphs of all `steps` live until the
        chunk's backward: activation memory is that of `step_batch_size` steps, as in the two-pass loop.

        Returns:
            μ_S at `steps`, `(len(steps) * B, ...)` step-major like `_step_rows`, float32.
        """
        batch = rollout.x.shape[0]
        means = []
        for j in steps:
            sigma = rollout.sigmas[j : j + 1].repeat(batch)
            supervised = bool(self._expert_coverage(teachers, sigma, weights).sum() > 0)
            with torch.set_grad_enabled(supervised), self.compute_loss_context_manager():
                _, mean, _ = self._rollout_step(rollout, model)
            means.append(mean)
        return torch.cat(means)

    def teacher_guidance(self, spec: TeacherSpec, task: str) -> Guidance:
        """Teacher `spec`'s guidance: its spec's scales, else `task`'s `teacher_guidance_scale[_2]`."""
        scale = spec.guidance_scale if spec.guidance_scale is not None else self.args.teacher_guidance_for(task)
        scale_2 = spec.guidance_scale_2
        return Guidance(scale, self.args.teacher_guidance_2_for(task) if scale_2 is None else scale_2)

    @contextlib.contextmanager
    def _teacher(self, spec: TeacherSpec):
        """The module that runs teacher `spec`: its own full model (lent to the device), or the shared transformer
        with the teacher's adapter active (none for the base anchor)."""
        if spec.name in self.full_teachers:
            with self._on_device(self.full_teachers[spec.name]) as module:
                yield module
            return
        transformer = self._unwrapped_model()
        with self.adapters.use(None if spec is self._base_anchor else spec.name):
            yield transformer

    @torch.no_grad()
    def teacher_means(self, spec: TeacherSpec, task: str, x, t, t_next, cond: Cond, t_guard: float) -> torch.Tensor:
        """Transition means of teacher `spec` at states `x` `(R, ...)` with its own guidance, no grad, float32.

        `task` is the task whose default teacher guidance applies when the spec sets none.
        """
        with self._teacher(spec) as module:
            return self._mean(module, x, t, t_next, cond, self.teacher_guidance(spec, task), t_guard)

    @torch.no_grad()
    def teacher_velocity(self, spec: TeacherSpec, task: str, x, t, cond: Cond) -> torch.Tensor:
        """Velocity of teacher `spec` at states `x` `(R, ...)` and noise levels `t` `(R,)`, with its own guidance, no
        grad (single-query supervision); `task` as in `teacher_means`."""
        with self._teacher(spec) as module:
            return self._velocity(module, x, t, cond, self.teacher_guidance(spec, task))

    def _unwrapped_model(self) -> torch.nn.Module:
        """`accelerator.unwrap_model(self.model)`, cached per model: accelerate's check for compiled regions walks
        every module, which with hundreds of teacher adapters costs more than a small model's teacher pass."""
        if getattr(self, "_unwrapped_for", None) is not self.model:
            self._unwrapped_for, self._unwrapped = self.model, self.accelerator.unwrap_model(self.model)
        return self._unwrapped

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module):
        """Lend an offloaded full teacher to the accelerator for one call.

        Its weights are copied from (pinned) host memory without blocking the host; afterwards the module points at
        its host copies again, which are still exact since a teacher is frozen, so nothing is copied back."""
        if not self.args.teacher_offload:
            yield module
            return
        tensors = [*module.parameters(), *module.buffers()]
        host = [tensor.data for tensor in tensors]
        for tensor in tensors:
            tensor.data = to_device(tensor.data, self.args.device)
        try:
            yield module
        finally:
            for tensor, data in zip(tensors, host):
                tensor.data = data

    def _routing(
        self, task: str, rows: list[dict], row_tasks: list[str] | None = None
    ) -> tuple[list[tuple[str, TeacherSpec]], torch.Tensor]:
        """Which teachers supervise each row, and with which weight.

        A row is supervised by its task's teachers (`row_tasks[i]` in a mixed-task batch), or by the teachers its
        `teachers` field names (routing by metadata); an `anchor_teacher` joins every row with `anchor_weight`.
        Returns the teachers used, as `(owner task, spec)`, each once however many rows it supervises (one pass per
        adapter), and weights `(B, K)` normalised per row.
        """
        if self.anchor_spec is not None:
            teachers, weights = self._routing_without_anchor(task, rows, row_tasks)
            share = self.args.anchor_weight
            anchor = torch.full((len(rows), 1), share, dtype=weights.dtype)
            return [*teachers, (task, self.anchor_spec)], torch.cat([(1 - share) * weights, anchor], 1)
        return self._routing_without_anchor(task, rows, row_tasks)

    def _routing_without_anchor(
        self, task: str, rows: list[dict], row_tasks: list[str] | None = None
    ) -> tuple[list[tuple[str, TeacherSpec]], torch.Tensor]:
        used: dict[str, tuple[str, TeacherSpec]] = {}
        per_row = []
        for index, row in enumerate(rows):
            names = row.get("teachers")
            if names:
                chosen = [self._teacher_by_name[n] for n in ([names] if isinstance(names, str) else names)]
            else:
                own = task if row_tasks is None else row_tasks[index]
                chosen = [(own, spec) for spec in self.teacher_specs[own]]
            per_row.append({spec.name for _, spec in chosen})
            for owner, spec in chosen:
                used.setdefault(spec.name, (owner, spec))
        teachers = list(used.values())
        weights = torch.tensor(
            [[spec.weight if spec.name in names else 0.0 for _, spec in teachers] for names in per_row]
        )
        return teachers, weights / weights.sum(1, keepdim=True)

    def _expert_coverage(self, teachers: list[tuple[str, TeacherSpec]], t, row_weights) -> torch.Tensor:
        """Zero the weight of each teacher on rows whose expert (`family.expert_index`) it has no LoRA for, and
        renormalise the others: such a row's loss comes from the covering teachers only (none: no loss)."""
        experts = list(self.family.experts)
        if all(len(spec.experts) == len(experts) for _, spec in teachers):
            return row_weights
        index = self.family.expert_index(t).to(row_weights.device)
        covered = torch.stack(
            [
                torch.isin(index, torch.tensor([experts.index(e) for e in spec.experts], device=index.device))
                for _, spec in teachers
            ],
            dim=1,
        )
        row_weights = row_weights * covered
        return row_weights / row_weights.sum(1, keepdim=True).clamp_min(1e-12)

    def _supervision(
        self,
        teachers: list[tuple[str, TeacherSpec]],
        weights: torch.Tensor,
        t: torch.Tensor,
        trained: torch.Tensor | None,
        device: torch.device,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Who supervises which rows of a chunk: the routing `weights` `(R, K)` (step-major rows, as `_step_rows`)
        restricted to the teachers covering each row's expert at noise level `t` `(R,)` and to the rows whose task
        trains that step (`trained` `(R,)` bool, mixed-task rounds; `None`: every row). Worked out on the host and
        copied over without blocking.

        Returns:
            `(subsets, active, weights)` on `device`: each teacher's rows, the rows some teacher supervises, and the
            weights `(R, K)`.
        """
        weights = self._expert_coverage(teachers, t, weights)
        if trained is not None:  # a row past its task's trained steps is not supervised there
            weights = weights * trained[:, None]
        subsets = [to_device(weights[:, k].nonzero().squeeze(1), device) for k in range(len(teachers))]
        active = to_device((weights.sum(1) > 0).nonzero().squeeze(1), device)
        return subsets, active, to_device(weights, device)

    def _conditionings(self, rows: list[dict], own_tasks: list[str]) -> tuple[Cond, Cond]:
        """The rows' conditioning as the teachers see it (their prompts) and as the student does (its task's prompt
        template, `task_prompt_templates`, applied; the same object when no template changes a prompt)."""
        prompts = [row["prompt"] for row in rows]
        images = [row_images(row) for row in rows]
        cond = self.prompt_cache(prompts, images)
        student_prompts = [self.args.student_prompt(own, prompt) for own, prompt in zip(own_tasks, prompts)]
        student_cond = cond if student_prompts == prompts else self.prompt_cache(student_prompts, images)
        return cond, student_cond

    def task_loss(
        self,
        model,
        task: str,
        rows: list[dict],
        generator: torch.Generator,
        backward: bool,
        row_tasks: list[str] | None = None,
        *,
        task_rows: int = 0,
        row_scales: torch.Tensor | None = None,
    ) -> tuple[float, torch.Tensor]:
        """Roll out, supervise and (optionally) back-propagate one task's loss.

        Per chunk of trained steps: who supervises which rows (`_supervision`), the teachers' means on their rows
        (`_teacher_targets`), the student's means in one pass (`_student_means`, or the fused rollout's own), and the
        distillation loss (`_distillation_loss`): a row's loss is the weighted mean of its teachers' per-step KLs
        (PPO-style surrogates with `loss_type="ppo"`). Rows whose conditionings differ in shape (input images of
        other sizes, or none) are rolled out as separate batches, one after the other, in mixed-task rounds too; the KL
        per step is their row-weighted mean.

        Args:
            task_rows: Rows of the whole task when `rows` is one such batch of it (the loss is a mean over them).
            row_scales: With `row_tasks`, the rows' loss weights when `rows` is one such batch of a mixed-task batch
                (`_row_scales` of the whole batch: a task's weight is shared among all its rows there).

        With `row_tasks` (a mixed-task batch; `task` is then only a label), row i belongs to task `row_tasks[i]`: its
        teachers, student prompt template and trained steps are that task's, and its loss weight is `_row_scales`'.

        Returns:
            `(loss, kl_per_step)`: the task's weighted loss (a float) and the unweighted KL per trained step `(T,)`.
        """
        args = self.args
        prompts = [row["prompt"] for row in rows]
        images = [row_images(row) for row in rows]
        groups = self.prompt_cache.groups(prompts, images) if any(images) else [list(range(len(rows)))]
        if len(groups) > 1:
            if row_tasks is not None:
                steps = torch.tensor([args.train_timesteps_for(own) for own in row_tasks])
                scales = self._row_scales(row_tasks, steps)
            results = [
                self.task_loss(
                    model,
                    task,
                    [rows[i] for i in group],
                    generator,
                    backward,
                    None if row_tasks is None else [row_tasks[i] for i in group],
                    task_rows=len(rows),
                    row_scales=None if row_tasks is None else scales[group],
                )
                for group in groups
            ]
            # A mixed batch's groups may train fewer steps (their tasks'): rows past them add zeros, as unsplit.
            kl = torch.zeros(max(len(kl_group) for _, kl_group in results), device=args.device)
            for (_, kl_group), group in zip(results, groups):
                kl[: len(kl_group)] += kl_group * len(group) / len(rows)
            return sum(loss for loss, _ in results), kl
        cond, student_cond = self._conditionings(rows, [task] * len(rows) if row_tasks is None else row_tasks)
        batch = len(rows)
        if row_tasks is None:
            num_steps = args.train_timesteps_for(task)
        else:
            row_steps = torch.tensor([args.train_timesteps_for(own) for own in row_tasks])
            num_steps = int(row_steps.max())
            row_scales = self._row_scales(row_tasks, row_steps) if row_scales is None else row_scales
            row_kl = torch.zeros(batch, device=args.device)
        # Fused: the rollout's own forward at each trained step is the student's pass (see `_fused_rollout_step`).
        fused = backward and args.fused_rollout
        # The rollout is the student's: it runs on the student's prompts (`task_prompt_templates`).
        if fused:
            rollout = self._rollout_begin(student_cond, generator, keep_states=True)
            sigmas = rollout.sigmas
        else:
            trajectory = self.rollout(student_cond, generator)
            states, sigmas = trajectory["states"], trajectory["sigmas"]
        t_guard = sigmas[1].item()
        task_weight = float((args.task_weights or {}).get(task, 1.0))
        teachers, weights = self._routing(task, rows, row_tasks)
        kl_per_step = torch.zeros(num_steps, device=args.device)
        loss_total = torch.zeros((), device=args.device)
        for steps in self._chunks(num_steps):
            if fused:
                fused_student = self._fused_rollout_step(model, rollout, steps, teachers, weights)
                states = rollout.trajectory()
            x, t, t_next = self._step_rows(states, sigmas, steps)
            t_host = sigmas[steps.start : steps.stop].repeat_interleave(batch)
            trained = None
            if row_tasks is not None:
                trained = torch.tensor(steps).repeat_interleave(batch) < row_steps.repeat(len(steps))
            subsets, active, row_weights = self._supervision(
                teachers, weights.repeat(len(steps), 1), t_host, trained, x.device
            )
            rows_cond = cond_tile(cond, len(steps))
            targets = self._teacher_targets(teachers, subsets, x, t, t_next, rows_cond, t_guard)
            with self.compute_loss_context_manager():
                if fused:
                    student = fused_student
                else:
                    student_rows_cond = rows_cond if student_cond is cond else cond_tile(student_cond, len(steps))
                    student = self._student_means(model, x, t, t_next, student_rows_cond, t_guard, active)
                kl, objective = self._distillation_loss(
                    task, teachers, subsets, targets, student, row_weights, states, steps, t, t_next, t_guard, backward
                )
                # mean over (steps, prompts) of the whole task, chunk by chunk
                if row_tasks is None:
                    loss = task_weight * objective.sum() / (num_steps * (task_rows or batch))
                else:
                    loss = (objective * to_device(row_scales, x.device).repeat(len(steps))).sum()
                    row_kl = row_kl + kl.detach().view(len(steps), batch).sum(0)
            if backward and loss.requires_grad:
                self.accelerator.backward(loss / getattr(self, "current_gradient_accumulation_steps", 1))
            loss_total = loss_total + loss.detach()
            kl_per_step[steps.start : steps.stop] = kl.detach().view(len(steps), batch).mean(1)
        if row_tasks is not None and backward:
            self._log_row_tasks("kl", row_tasks, row_kl / to_device(row_steps, row_kl.device))
        loss_value = loss_total.item()  # the task's one read-back, after all its chunks are queued
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"Non-finite loss ({loss_value}) for task '{task}' at optimizer step {self.state.global_step}; "
                "training stopped before the update, so the last checkpoint is intact."
            )
        return loss_value, kl_per_step

    def _teacher_targets(
        self, teachers: list[tuple[str, TeacherSpec]], subsets: list[torch.Tensor], x, t, t_next, cond, t_guard
    ) -> list[torch.Tensor | None]:
        """Each teacher's transition means on the rows it supervises (`subsets`), one pass per teacher however many
        rows it has; `None` for a teacher with no rows in this chunk."""
        return [
            self.teacher_means(spec, owner, x[idx], t[idx], t_next[idx], cond_select(cond, idx), t_guard)
            if len(idx)
            else None
            for (owner, spec), idx in zip(teachers, subsets)
        ]

    def _student_means(self, model, x, t, t_next, cond, t_guard, active: torch.Tensor) -> torch.Tensor | None:
        """The student's transition means `(R, ...)` with grad, from one pass over the rows `active` (those some
        teacher supervises). The other rows are left out of the pass, so an expert no teacher covers gets no gradient
        (not a zero one, which weight decay would still act on), and are zeros here; `None` when no row is active."""
        if not len(active):
            return None
        every = len(active) == x.shape[0]
        part = (x, t, t_next, cond) if every else (x[active], t[active], t_next[active], cond_select(cond, active))
        mean = self._mean(model, *part, self.student_guidance, t_guard)
        return mean if every else torch.zeros_like(x).index_copy(0, active, mean)

    def _distillation_loss(
        self,
        task: str,
        teachers: list[tuple[str, TeacherSpec]],
        subsets: list[torch.Tensor],
        targets: list[torch.Tensor | None],
        student: torch.Tensor | None,
        weights: torch.Tensor,
        states: torch.Tensor,
        steps: range,
        t,
        t_next,
        t_guard: float,
        log: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's per-row KL `(R,)` of the student's means to its teachers' (`transition.closed_form_kl`,
        weighted by `weights` `(R, K)`) and the per-row objective `(R,)`: that KL, or with `loss_type="ppo"` the PPO
        surrogate toward the same targets at the sampled next states of `states`. With `log`, each teacher's share of
        an ensemble or of routed rows is logged as `kl/{task}/{teacher}`."""
        args = self.args
        kl = torch.zeros(t.shape[0], device=t.device)
        objective = torch.zeros_like(kl)
        for k, ((_, spec), idx, target) in enumerate(zip(teachers, subsets, targets)):
            if target is None:
                continue
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
            kl = kl.index_add(0, idx, weights[idx, k] * kl_k)
            if args.loss_type == "ppo":
                kl_k = self._ppo_rows(states, steps, idx, student[idx], target, t[idx], t_next[idx], t_guard)
            objective = objective.index_add(0, idx, weights[idx, k] * kl_k)
            if log and len(teachers) > 1:
                self._metrics[f"kl/{task}/{spec.name}"].append(kl_k.detach().mean())
        return kl, objective

    def _ppo_rows(self, states, steps, idx, student, target, t, t_next, t_guard) -> torch.Tensor:
        args = self.args
        sample = states[steps.start + 1 : steps.stop + 1].flatten(0, 1)[idx]
        std = transition.step_std(t, t_next, args.noise_level, args.sde_type, t_guard)
        old = student.detach()  # on-policy: the rollout policy is the current student
        return transition.ppo_surrogate_loss(sample, student, old, target, std, args.ppo_clip_range)

    def _row_scales(self, row_tasks: list[str], row_steps: torch.Tensor) -> torch.Tensor:
        """Loss weight of each row of a mixed-task batch per trained step, `(B,)`.

        With uniform task draws, row i of task τ weighs w_τ / (T_τ B_τ) (w: `task_weights`, T_τ its trained steps,
        B_τ its rows here): the loss is the sum over the drawn tasks of their weighted mean losses, the round-robin
        round's loss restricted to those tasks. With `task_sampling="weighted"` the weights are in the draws, so each
        draw of R / k rows weighs 1 / (T_τ R / k).
        """
        args = self.args
        counts = collections.Counter(row_tasks)
        if args.task_sampling == "weighted":
            share = len(row_tasks) / args.tasks_per_round
            return torch.tensor([1.0 / share for _ in row_tasks]) / row_steps
        weights = args.task_weights or {}
        return torch.tensor([float(weights.get(own, 1.0)) / counts[own] for own in row_tasks]) / row_steps

    def _log_row_tasks(self, name: str, row_tasks: list[str], values: torch.Tensor) -> None:
        """Log the mean of a per-row metric per task of a mixed-task batch as `{name}/{task}`."""
        for own in dict.fromkeys(row_tasks):
            index = torch.tensor([i for i, other in enumerate(row_tasks) if other == own], device=values.device)
            self._metrics[f"{name}/{own}"].append(values[index].mean())

    def query_steps(self, task: str) -> list[int]:
        """Sampler steps j that single-query supervision may pick for `task`'s rows: its trained steps whose noise
        level σ_j is in `query_sigma_range`."""
        low, high = self.args.query_sigma_bounds
        sigmas = self.family.sigmas(self.args.num_inference_steps, self.args.resolution)
        return [j for j in range(self.args.train_timesteps_for(task)) if low <= float(sigmas[j]) <= high]

    def single_query_loss(
        self,
        model,
        task: str,
        rows: list[dict],
        generator: torch.Generator,
        backward: bool,
        row_tasks: list[str] | None = None,
        *,
        scales: torch.Tensor | None = None,
    ) -> tuple[float, torch.Tensor]:
        """`query_mode="single"` (DanceOPD): each row is supervised at one state of its rollout.

        The student rolls out with no grad up to the latest queried step; row i's state x_{j_i} (j_i drawn uniformly
        from `query_steps` of its task) gets one pass of each of its teachers (grouped per adapter, as `task_loss`)
        and one student pass with grad; the row's loss is the weighted velocity MSE to its teachers. `row_tasks` as
        in `task_loss`; the loss is the mean over rows (weighted by `task_weights` per task, or `_row_scales`).
        Rows whose conditionings differ in shape (input images of other sizes) are rolled out as separate batches.

        Args:
            scales: The rows' loss weights when `rows` is one such batch of a larger one (that batch's weights).

        Returns:
            `(loss, mse)`: the weighted loss (a float) and the per-row velocity MSE `(B,)`.
        """
        args = self.args
        own_tasks = [task] * len(rows) if row_tasks is None else list(row_tasks)
        prompts = [row["prompt"] for row in rows]
        images = [row_images(row) for row in rows]
        batch = len(rows)
        if scales is None and row_tasks is None:
            scales = torch.full((batch,), float((args.task_weights or {}).get(task, 1.0)) / batch)
        elif scales is None:
            scales = self._row_scales(own_tasks, torch.ones(batch))
        groups = self.prompt_cache.groups(prompts, images) if any(images) else [list(range(batch))]
        if len(groups) > 1:
            mse = torch.zeros(batch, device=args.device)
            loss = 0.0
            for group in groups:
                part = [rows[i] for i in group]
                own = None if row_tasks is None else [row_tasks[i] for i in group]
                loss_group, mse_group = self.single_query_loss(
                    model, task, part, generator, backward, own, scales=scales[group]
                )
                loss += loss_group
                mse[group] = mse_group.to(mse.device)
            return loss, mse
        cond, student_cond = self._conditionings(rows, own_tasks)
        choices = {own: self.query_steps(own) for own in set(own_tasks)}
        picks = [int(torch.randint(len(choices[own]), (1,), generator=generator)) for own in own_tasks]
        query = torch.tensor([choices[own][pick] for own, pick in zip(own_tasks, picks)])
        rollout = self._rollout_begin(student_cond, generator, keep_states=True)
        transformer = self._unwrapped_model()
        with torch.no_grad():
            for _ in range(int(query.max())):
                self._rollout_step(rollout, transformer)
        device = rollout.x.device
        x = rollout.trajectory()[query.to(device), torch.arange(batch, device=device)]
        t_host = rollout.sigmas[query]
        t = to_device(t_host, x.device)
        teachers, weights = self._routing(task, rows, row_tasks)
        subsets, active, weights = self._supervision(teachers, weights, t_host, None, x.device)
        targets = [
            self.teacher_velocity(spec, owner, x[idx], t[idx], cond_select(cond, idx)) if len(idx) else None
            for (owner, spec), idx in zip(teachers, subsets)
        ]
        mse = torch.zeros(batch, device=x.device)
        loss = torch.zeros((), device=x.device)
        with torch.set_grad_enabled(backward), self.compute_loss_context_manager():
            if len(active):
                part = self._velocity(
                    model, x[active], t[active], cond_select(student_cond, active), self.student_guidance
                )
                student = torch.zeros_like(x, dtype=part.dtype).index_copy(0, active, part)
                for k, (idx, target) in enumerate(zip(subsets, targets)):
                    if target is not None:
                        mse = mse.index_add(0, idx, weights[idx, k] * transition.velocity_mse(student[idx], target))
                loss = (mse * to_device(scales, x.device)).sum()
        if backward and loss.requires_grad:
            self.accelerator.backward(loss / getattr(self, "current_gradient_accumulation_steps", 1))
        loss_value = loss.detach().item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"Non-finite loss ({loss_value}) for task '{task}' at optimizer step {self.state.global_step}; "
                "training stopped before the update, so the last checkpoint is intact."
            )
        return loss_value, mse.detach()

    def _check_guidance_2(self, args: DiffusionOPDConfig) -> None:
        super()._check_guidance_2(args)
        teacher_2 = args.teacher_guidance_scale_2 is not None or any(
            spec.guidance_scale_2 is not None for specs in self.teacher_specs.values() for spec in specs
        )
        if teacher_2 and len(self.family.experts) < 2:
            raise ValueError(
                "`teacher_guidance_scale_2` / a teacher's `guidance_scale_2` applies to pipelines with two experts "
                f"(Wan 2.2 A14B); {type(self.pipeline).__name__} has one transformer here."
            )

    def _chunks(self, num_steps: int):
        if self.args.step_batch_size != "auto":
            return super()._chunks(num_steps)
        if getattr(self, "_auto_step_batch_size", None) is None:
            bytes_per_prompt = self._saved_bytes_per_prompt()
            free = free_memory_bytes(self.args.device)
            prompts = self.args.per_device_train_batch_size
            self._auto_step_batch_size, reason = choose_step_batch_size(num_steps, prompts, bytes_per_prompt, free)
            probe = self._probe_row()
            if probe is not None:
                reason += f", measured on the row {probe['prompt']!r} with its input image(s) (the largest)"
            logger.warning(f"step_batch_size='auto': {reason}.")
        size = self._auto_step_batch_size
        return [range(s, min(s + size, num_steps)) for s in range(0, num_steps, size)]

    def training_step(self, model, inputs: dict[str, list[dict]], num_items_in_batch=None) -> torch.Tensor:
        """One round: every task in order, losses accumulated, one optimizer step afterwards (by the Trainer).

        With `tasks_per_round` or `query_mode="single"`, `_scaled_training_step` runs the round instead."""
        if self.args.tasks_per_round is not None or self.args.query_mode != "dense":
            return self._scaled_training_step(model, inputs)
        start = time.perf_counter()
        ensure_eval(model)  # `model.eval()`, without its walk over every adapter when nothing is training
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
            self._metrics[f"kl/{task}"].append(kl_per_step.mean())  # a device tensor, read back at logging
            self._metrics[f"loss/{task}"].append(loss)
        # Tasks may train different step counts (`task_timestep_fraction`): a step's KL averages the tasks that train it.
        longest = max(len(kl) for kl in kl_steps)
        padded = [torch.nn.functional.pad(kl, (0, longest - len(kl)), value=float("nan")) for kl in kl_steps]
        for j, value in enumerate(torch.stack(padded).nanmean(0).unbind()):
            self._metrics[f"kl_step/{j}"].append(value)
        self._metrics["round_time"].append(time.perf_counter() - start)
        return to_device(torch.tensor(total), self.args.device)

    def _scaled_training_step(self, model, inputs: dict[str, list[dict]]) -> torch.Tensor:
        """A mixed-task round (`tasks_per_round`: all drawn rows in one rollout batch, one pass per teacher adapter)
        and/or single-query supervision (`query_mode="single"`); one optimizer step afterwards (by the Trainer)."""
        start = time.perf_counter()
        ensure_eval(model)  # `model.eval()`, without its walk over every adapter when nothing is training
        step = self.state.global_step
        rank = self.accelerator.process_index
        single = self.args.query_mode == "single"
        loss_fn = self.single_query_loss if single else self.task_loss
        if self.args.tasks_per_round is not None:
            rows = [row for task in inputs for row in inputs[task]]
            row_tasks = [task for task in inputs for _ in inputs[task]]
            loss, per = loss_fn(model, "mixed", rows, self._generator(step, rank, "mixed"), True, row_tasks=row_tasks)
            self._metrics["loss/mixed"].append(loss)
            self._metrics["tasks_in_round"].append(float(len(inputs)))
            if single:
                self._log_row_tasks("mse", row_tasks, per)
            else:
                for j, value in enumerate(per.unbind()):
                    self._metrics[f"kl_step/{j}"].append(value)
            total = loss
        else:
            total = 0.0
            tasks = list(inputs)
            for index, task in enumerate(tasks):
                sync = contextlib.nullcontext() if index == len(tasks) - 1 else self.accelerator.no_sync(model)
                with sync:
                    loss, mse = loss_fn(model, task, inputs[task], self._generator(step, rank, task), True)
                total += loss
                self._metrics[f"mse/{task}"].append(mse.mean())
                self._metrics[f"loss/{task}"].append(loss)
        self._metrics["round_time"].append(time.perf_counter() - start)
        return to_device(torch.tensor(total), self.args.device)

    def get_train_dataloader(self) -> DataLoader:
        """Mixed-task rounds (`tasks_per_round`) draw from `MixedTaskPrompts`; otherwise the round-robin rounds."""
        args = self.args
        if args.tasks_per_round is None:
            return super().get_train_dataloader()
        rows = args.rows_per_round or args.per_device_train_batch_size * args.tasks_per_round
        weights = None
        if args.task_sampling == "weighted":
            weights = {task: float((args.task_weights or {}).get(task, 1.0)) for task in self.task_prompts}
        rounds = MixedTaskPrompts(
            self.task_prompts, args.tasks_per_round, rows, self.accelerator.num_processes, args.seed, weights
        )
        loader = DataLoader(rounds, batch_size=1, sampler=SequentialSampler(rounds), collate_fn=lambda items: items[0])
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------ evaluation
    def eval_metric_names(self) -> list[str]:
        tasks = list(self.eval_prompts or self.teacher_specs)
        return ["loss", "kl", *(f"kl/{task}" for task in tasks)]

    @torch.no_grad()
    def _evaluate_tasks(
        self, prompts: dict[str, list[str] | list[dict]] | None, seed: int, use_ema: bool
    ) -> dict[str, tuple[float, float]]:
        """`{task: (loss, kl)}` on fresh student rollouts of `prompts` (`None`: `eval_dataset`), sampled in batches of
        `per_device_eval_batch_size` from one generator per task, averaged over the prompts."""
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
                # One generator for the task's batches: with the ODE sampler the rollouts do not depend on the batching.
                generator = self._generator("eval", seed, task)
                loss = kl = 0.0
                for batch in self._eval_batches(rows):
                    batch_loss, batch_kl = self.task_loss(model, task, batch, generator, backward=False)
                    loss += batch_loss * len(batch)
                    kl += batch_kl.mean().item() * len(batch)
                result[task] = (loss / len(rows), kl / len(rows))
        return result

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
        return {task: kl for task, (_, kl) in self._evaluate_tasks(prompts, seed, use_ema).items()}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """KL to each teacher on held-out prompts (`eval_dataset`), logged as `{prefix}_kl/{task}`, their mean over
        tasks as `{prefix}_kl`, and the training objective on them (the task-weighted sum of the task losses, as the
        logged `loss` of a round) as `{prefix}_loss`. The Trainer calls it every `eval_steps` with
        `eval_strategy="steps"` (every epoch, a pass over the largest task's prompts, with `"epoch"`)."""
        prompts = prompts_by_task(eval_dataset) if eval_dataset is not None else None
        start = time.perf_counter()
        results = self._evaluate_tasks(prompts, seed=0, use_ema=True)
        metrics = {f"{metric_key_prefix}_kl/{task}": kl for task, (_, kl) in results.items()}
        metrics[f"{metric_key_prefix}_kl"] = sum(kl for _, kl in results.values()) / len(results)
        metrics[f"{metric_key_prefix}_loss"] = sum(loss for loss, _ in results.values())
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
