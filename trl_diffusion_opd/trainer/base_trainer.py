"""`DiffusionLoRATrainer`: what every trainer of this package shares.

DiffusionOPD (`opd_trainer.py`), Flow-GRPO / GRPO-Guard (`grpo_trainer.py`) and DiffusionNFT (`nft_trainer.py`) all train
one LoRA, the *student*, on a frozen flow-matching base. This module holds their common machinery so that it exists
once: loading the pipeline and its family, creating (or continuing) the student adapter in float32, the
student-only optimizer, the prompt-embedding cache, EMA weights, seeded generators, sampling (`rollout`,
`generate`), the diffusers-format adapter export with its adapter metadata, checkpoint save / exact resume, the model
card on every checkpoint, `push_to_hub`, and metric logging through `self._metrics`.

A subclass sets `self.task_prompts` (and `self.eval_prompts`) before calling `DiffusionLoRATrainer.__init__`,
implements `training_step`, and may override the hooks `_load_extra_models` (e.g. teacher adapters),
`_add_auxiliary_adapters` (e.g. NFT's old policy), `_place_models`, `_default_guidance` and `_model_card_details`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import torch
from accelerate.utils import DistributedType, set_seed
from diffusers import DiffusionPipeline
from diffusers.training_utils import EMAModel, cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import IntervalStrategy, rotate_checkpoints

from .. import transition
from ..data import PromptRow, RoundRobinPrompts, image_digest, load_prompt_source, prompts_by_task, row_images
from ..families.base import NEGATIVE_PREFIX, Cond, FlowMatchingFamily, cond_cat, cond_tile, get_family
from ..hub import create_model_card, push_checkpoint, push_to_hub
from ..lora_io import adapter_metadata, check_lora_folder, expert_weight_name, lora_config_for, read_lora_folder
from ..registry import load_pipeline
from ..safe_io import load_ema_state, save_ema_state
from ..sizes import Resolution
from ..teachers import STUDENT, AdapterSwitch, TeacherSpec, add_adapter, parse_teacher_spec, resolve_teacher
from .base_config import DiffusionTrainingConfig
from .callbacks import DiffusersTensorBoardCallback, RewardEvalCallback
from .checkpointing import (
    EMA_STATE,
    RESUME_AUTO,
    TRAINING_ARGS,
    TRAINING_WEIGHTS,
    OutputDirLock,
    StopOnSignal,
    check_checkpoint,
    publish_checkpoint,
    remove_partial_checkpoints,
    resolve_resume,
    staging_run_dir,
    write_error,
)
from .module_walks import StudentGrads
from .rollout import Guidance, RolloutState


DEFAULT_TASK = "default"


def default_lora_config(family: FlowMatchingFamily) -> LoraConfig:
    """The paper's student adapter: r=32, alpha=64, gaussian init, on the family's attention projections."""
    return LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=family.default_lora_targets)


def prompt_rows(dataset: Any, name: str = "train_dataset") -> dict[str, list[PromptRow]]:
    """Prompts of an RL trainer as `{task: rows}`.

    Accepts `{task: source}`, a dataset / list whose rows all have a `task` field (split by task), or any single
    prompt source (`load_prompt_source`), which becomes the one task `"default"`. Rows keep their metadata, which
    rewards receive.
    """
    if isinstance(dataset, Mapping) and not isinstance(dataset, datasets.DatasetDict):
        return prompts_by_task(dataset)
    rows = load_prompt_source(dataset, name)
    if all("task" in row for row in rows):
        return prompts_by_task(rows)
    return {DEFAULT_TASK: rows}


def resolve_student_adapter(
    spec: Any, cache_dir: str | None = None, token: str | bool | None = None
) -> TeacherSpec | None:
    """The `student_adapter` to continue from, resolved (local folder or Hub) and its LoRA files checked; `None`
    when `spec` is `None`.

    Raises:
        ValueError: one line naming `student_adapter`: the adapter is not found, is a full model, or a file of it
            is malformed.
    """
    if spec is None:
        return None
    parsed = parse_teacher_spec(STUDENT, spec)
    folder = resolve_teacher(parsed, cache_dir=cache_dir, token=token)
    owner = f"`student_adapter` '{parsed.display}'"
    if parsed.full_weight:
        raise ValueError(f"{owner} is a full model, not a LoRA to continue from.")
    check_lora_folder(folder, parsed.weight_name, owner)
    return parsed


def check_eval_strategy(args: DiffusionTrainingConfig, eval_prompts: Any) -> None:
    """A periodic evaluation (`eval_strategy` other than `"no"`) has held-out prompts to run on.

    Raises:
        ValueError: one line, when `eval_prompts` is empty or `None` and `args.eval_strategy` is not `"no"`.
    """
    if args.eval_strategy != IntervalStrategy.NO and not eval_prompts:
        raise ValueError(
            f"`eval_strategy='{IntervalStrategy(args.eval_strategy).value}'` needs held-out prompts: pass "
            "`eval_dataset` (`eval_prompts` or `dataset_test_split` in a config), or set `eval_strategy='no'`."
        )


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`. A host tensor bound for a CUDA device is copied from pinned memory without blocking, so
    the host keeps queueing work (a plain `.to` from pageable memory waits for the device); other moves are `.to`."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def free_memory_bytes(device: torch.device | str) -> int:
    """Bytes that new tensors on `device` can still take: on CUDA the driver's free memory plus what PyTorch's caching
    allocator holds unused; on a CPU the available RAM (`psutil`)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil  # a dependency of accelerate

    return psutil.virtual_memory().available


def choose_step_batch_size(
    num_steps: int, prompts: int, bytes_per_prompt: float, free_bytes: float, fraction: float = 0.8
) -> tuple[int, str]:
    """The largest number of trained steps per call whose saved activations fit in `fraction` of the free memory.

    Args:
        num_steps: Trained steps T of a task.
        prompts: Prompts per task and call (B): a chunk of k steps keeps k * B prompts' activations.
        bytes_per_prompt: Bytes autograd saves for one prompt's student pass at one step (CFG rows included).
        free_bytes: Free memory on the device, in bytes (`free_memory_bytes`).
        fraction: Share of the free memory the activations may take (the rest: the teachers' passes, the
            allocator's fragmentation, the optimizer state created at the first step).

    Returns:
        `(size, reason)`: `size` in `[1, num_steps]` (1 when even one step does not fit), and one sentence saying why.
    """
    per_step = prompts * bytes_per_prompt
    fit = int(fraction * free_bytes // per_step) if per_step > 0 else num_steps
    size = max(1, min(num_steps, fit))
    gib = 2.0**30
    reason = (
        f"{size} of {num_steps} trained steps per call: saved activations ~{per_step / gib:.3g} GiB per step "
        f"({prompts} prompts x {bytes_per_prompt / gib:.3g} GiB), {fraction:.0%} of {free_bytes / gib:.3g} GiB free "
        f"holds {fit}"
    )
    if fit < 1:
        reason += "; one step at a time may not fit (lower the batch or enable gradient checkpointing)"
    return size, reason


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: a sharded DTensor (FSDP2) gathered from every rank, any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _like_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """Whole adapter weights `state` (PEFT naming, as saved) shaped like the live parameters: each one sharded like
    its parameter when that is a DTensor (FSDP2), so loading copies shard into shard; unchanged otherwise."""
    params = {
        name.replace(f".{adapter}.", "."): param
        for name, param in model.named_parameters()
        if f".{adapter}." in name and hasattr(param, "device_mesh")
    }
    if not params:
        return state
    from torch.distributed.tensor import distribute_tensor

    return {
        key: distribute_tensor(value.to(params[key].dtype), params[key].device_mesh, params[key].placements)
        if key in params
        else value
        for key, value in state.items()
    }


class PromptCache:
    """LRU cache of prompt conditionings, so each prompt goes through the text encoders once.

    A row with input images (editing families) is cached under its prompt and its images' pixels
    (`data.image_digest`): its reference latents are computed once too.

    When the family's negative branch depends on the images (`FlowMatchingFamily.encode_negative`), such a row's
    conditioning also holds `negative_prompt` encoded with its images, under `NEGATIVE_PREFIX` keys.

    Args:
        family: Encodes missing prompts.
        max_size: Number of conditionings kept.
        negative_prompt: The CFG negative prompt, encoded per row with its images when the family asks for it.
    """

    def __init__(self, family: FlowMatchingFamily, max_size: int, negative_prompt: str = ""):
        self.family = family
        self.max_size = max_size
        self.negative_prompt = negative_prompt
        self._rows: OrderedDict[Any, Cond] = OrderedDict()
        self.encoders_offloaded = False

    def warm(self, prompts: list[str], batch_size: int = 32, image_rows: list | None = None) -> bool:
        """Embed every prompt (and every `(prompt, images)` of `image_rows`, editing rows) now and move the text
        encoders off the accelerator, if they all fit in the cache.

        Returns:
            Whether the encoders were offloaded. A prompt seen later still works: the encoders visit the
            accelerator for it and leave again.
        """
        prompts = list(dict.fromkeys(prompts))
        image_rows = list({(p, image_digest(im)): (p, im) for p, im in image_rows or []}.values())
        if len(prompts) + len(image_rows) > self.max_size:
            return False
        for start in range(0, len(prompts), batch_size):
            self(prompts[start : start + batch_size])
        for prompt, images in image_rows:
            self([prompt], [images])
        for encoder in self.family.text_encoders:
            encoder.to("cpu")
        self.encoders_offloaded = True
        return True

    def _encode(self, prompts: list[str], images: list | None = None) -> Cond:
        args = (prompts,) if images is None else (prompts, images)
        if not self.encoders_offloaded:
            return self._encode_rows(*args)
        device = self.family.device
        for encoder in self.family.text_encoders:
            encoder.to(device)
        try:
            return self._encode_rows(*args)
        finally:
            for encoder in self.family.text_encoders:
                encoder.to("cpu")

    def _encode_rows(self, prompts: list[str], images: list | None = None) -> Cond:
        if images is None:
            return self.family.encode_prompts(prompts)
        cond = self.family.encode_prompts(prompts, images)
        negative = self.family.encode_negative(self.negative_prompt, images)
        if negative is not None:
            cond.update({NEGATIVE_PREFIX + key: value for key, value in negative.items()})
        return cond

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, prompts: list[str], images: list | None = None) -> list[Cond]:
        """One conditioning `(1, ...)` per prompt, in order; `images` gives each prompt's input images (a list of
        PIL images, or `None`)."""
        images = list(images) if images is not None else [None] * len(prompts)
        keys = [p if im is None else (p, image_digest(im)) for p, im in zip(prompts, images)]
        missing = {}
        for key, prompt, image in zip(keys, prompts, images):
            if key not in self._rows:
                missing.setdefault(key, (prompt, image))
        text = [key for key, (_, image) in missing.items() if image is None]
        if text:
            cond = self._encode([missing[key][0] for key in text])
            for i, key in enumerate(text):
                # A copy, so that evicting a prompt frees its memory rather than keeping its batch alive.
                self._rows[key] = {k: v[i : i + 1].clone() for k, v in cond.items()}
        for key, (prompt, image) in missing.items():
            if image is not None:  # the pipelines take one set of references per call
                self._rows[key] = self._encode([prompt], [image])
        rows = []
        for key in keys:
            self._rows.move_to_end(key)
            rows.append(self._rows[key])
        while len(self._rows) > self.max_size:
            self._rows.popitem(last=False)
        return rows

    def __call__(self, prompts: list[str], images: list | None = None) -> Cond:
        """Conditioning with one row per prompt, in order (see `rows`)."""
        return cond_cat(self.rows(prompts, images))

    def groups(self, prompts: list[str], images: list | None = None) -> list[list[int]]:
        """Indices of the prompts whose conditionings have the same `family.batch_key` (the same reference sizes and
        layout, or none), in first-seen order: the rows that can share a batch."""
        groups: dict[tuple, list[int]] = {}
        for index, cond in enumerate(self.rows(prompts, images)):
            groups.setdefault(self.family.batch_key(cond), []).append(index)
        return list(groups.values())


class _EMACallback(TrainerCallback):
    def __init__(self, trainer: DiffusionLoRATrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None and state.global_step % args.ema_update_interval == 0:
            self.trainer.ema.step(self.trainer.student_parameters)


class DiffusionLoRATrainer(Trainer):
    """Base of the package's trainers: a LoRA student on a frozen flow-matching pipeline (see the module docstring).

    Args:
        model: The base pipeline: a Hub id, a local path, or a `DiffusionPipeline` of a supported model family.
        args: A `DiffusionTrainingConfig` (or a subclass).
        peft_config: The student adapter; `None` uses `default_lora_config`. Ignored when `args.student_adapter`
            names an adapter to continue from.
        callbacks: Extra `TrainerCallback`s.
    """

    # The model card adds the family's task (`family.pipeline_tag`: text-to-image, text-to-video, image-to-video, ...)
    # and its tag after these.
    _tag_names = ["trl", "diffusers", "lora"]
    _name = "Diffusion LoRA"
    _paper: dict[str, str] = {}

    task_prompts: dict[str, list[PromptRow]]
    eval_prompts: dict[str, list[PromptRow]] | None = None
    # A results table for the model card (`hub.create_model_card`'s `results`), e.g. an `EvaluationResult`.
    model_card_results: Any = None
    # Whether the trainer conditions on rows' input images (`data.row_images`); others refuse such rows.
    _uses_input_images = False

    def __init__(
        self,
        model: str | DiffusionPipeline,
        args: DiffusionTrainingConfig,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ):
        # checked before the base is loaded
        self._student_spec = resolve_student_adapter(args.student_adapter, token=args.hub_token)
        if isinstance(model, str):  # a Hub id, a folder or a registered name (`tiny:sd3`, `world:base`)
            pipeline = load_pipeline(model, torch_dtype=args.torch_dtype, revision=args.revision, token=args.hub_token)
            self.base_model_id = model
        else:
            pipeline = model
            name = getattr(model, "name_or_path", None) or model.config.get("_name_or_path")
            # diffusers keeps whatever `from_pretrained` was given, a `Path` included
            self.base_model_id = str(name) if name is not None else None
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        # Only video families take `num_frames`, so image families never see it unless the user sets it.
        frames = {"num_frames": args.num_frames} if args.num_frames is not None else {}
        self.family = get_family(pipeline, args.family_kwargs, max_sequence_length=args.max_sequence_length, **frames)
        self._check_guidance_2(args)
        self._check_input_images()
        # The module the Trainer trains: the transformer, or a router over the experts (Wan 2.2) that carries the
        # student on each of them.
        transformer = self.family.denoiser
        self.family.check_resolution(args.resolution)
        transformer.requires_grad_(False)
        transformer.eval()  # no dropout: rollouts and recomputed means must agree
        for module in transformer.modules():
            # bitsandbytes' 4-bit layers, in eval mode on a CPU with AVX512-BF16, repack their weights on the first
            # no-grad forward (the rollout) for an inference-only kernel that the student's gradient cannot cross.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False

        self._load_extra_models(transformer, args)
        set_seed(args.seed)  # the student's random init is a function of the seed
        self.peft_config = self._add_student(transformer, peft_config, args)
        self._add_auxiliary_adapters(transformer, args)
        self._freeze_all_but_student(transformer)
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

        self._check_evaluation(args)
        super().__init__(
            model=transformer,
            args=args,
            train_dataset=RoundRobinPrompts(self.task_prompts, 1, 1, args.seed),  # replaced in get_train_dataloader
            # `{task: rows}`: the Trainer only checks that an eval set exists; `evaluate` (a subclass's) reads it.
            eval_dataset=self.eval_prompts or None,
            callbacks=callbacks,
        )
        self._metrics: dict[str, list[float]] = defaultdict(list)
        device = self.args.device
        for encoder in self.family.text_encoders:
            encoder.to(device)
        self._place_models(device)
        self.prompt_cache = PromptCache(self.family, args.prompt_cache_size, args.negative_prompt)
        if args.offload_text_encoders:
            every, edits = [], []
            for prompts in (self.task_prompts, self.eval_prompts or {}):
                for task, rows in prompts.items():
                    texts = [row["prompt"] for row in rows if not row.get("image")]
                    every += texts + [text for text in self.student_prompts(task, texts) if text not in texts]
                    for row in rows:  # editing rows: their prompts (and students') with their images
                        if row.get("image"):
                            images = row_images(row)
                            edits += [
                                (text, images)
                                for text in dict.fromkeys(
                                    [row["prompt"], *self.student_prompts(task, [row["prompt"]])]
                                )
                            ]
            self.prompt_cache.warm([args.negative_prompt, *every], image_rows=edits)
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
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)
        self._staging_step: int | None = None  # the step whose checkpoint is being written, while it is
        self._deferred_push = False
        self.model_accepts_loss_kwargs = False
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self.model_tags)

    @property
    def model_tags(self) -> list[str]:
        """The trainer's `_tag_names`, then its family's task (`pipeline_tag`) and tag: the model card's fixed tags."""
        return list(dict.fromkeys([*self._tag_names, self.family.pipeline_tag, self.family.tag]))

    def _check_guidance_2(self, args: DiffusionTrainingConfig) -> None:
        if len(self.family.experts) > 1 and args.ddp_find_unused_parameters is False:
            # unset, the Trainer gives DDP `find_unused_parameters=True` for a non-`PreTrainedModel` module
            raise ValueError(
                "`ddp_find_unused_parameters` cannot be false with two experts: a step whose rows all run one expert "
                "leaves the other's LoRA without gradient; leave it unset."
            )
        if args.guidance_scale_2 is not None and len(self.family.experts) < 2:
            raise ValueError(
                f"`guidance_scale_2` applies to pipelines with two experts (Wan 2.2 A14B); {type(self.pipeline).__name__}"
                " has one transformer here."
            )

    def eval_metric_names(self) -> list[str]:
        """The metrics `evaluate()` reports, without the `eval_` prefix (what `metric_for_best_model` may name)."""
        return []

    def _check_evaluation(self, args: DiffusionTrainingConfig) -> None:
        """One-line errors, before any model work, for a periodic evaluation without an eval set and for a
        `metric_for_best_model` that `evaluate()` does not report (transformers would fail at the first evaluation)."""
        check_eval_strategy(args, self.eval_prompts)
        metric = args.metric_for_best_model
        if metric is None:
            return
        names = self.eval_metric_names()
        if metric.removeprefix("eval_") not in names:
            raise ValueError(
                f"`metric_for_best_model` is '{metric}', which {type(self).__name__}.evaluate() does not report; "
                f"choose one of {names}."
            )

    def _eval_batches(self, rows: list) -> list[list]:
        """`rows` in batches of `per_device_eval_batch_size`: an evaluation never samples more at once."""
        size = max(1, self.args.per_device_eval_batch_size)
        return [rows[start : start + size] for start in range(0, len(rows), size)]

    def _check_input_images(self) -> None:
        """Rows with input images need a trainer that uses them and a family that takes that many (one line naming
        the first row that does not fit)."""
        for prompts in (self.task_prompts, self.eval_prompts or {}):
            for task, rows in prompts.items():
                for index, row in enumerate(rows):
                    count = len(row.get("image") or ())
                    where = f"Task '{task}' row {index} ({row['prompt']!r})"
                    if count and not self._uses_input_images:
                        raise ValueError(f"{where} has input images, which the {self._name} trainer does not use.")
                    # every row: an image-to-video family refuses one without its first frame
                    self.family.check_input_images(count, where)

    @property
    def student_guidance(self) -> Guidance:
        """The student's guidance: `guidance_scale` and `guidance_scale_2`."""
        return Guidance(self.args.guidance_scale, self.args.guidance_scale_2)

    def _velocity(self, transformer, x, sigma, cond, guidance: Guidance, negative: Cond | None = None):
        """`family.velocity` at `guidance`, passing the second expert's scale only when one is set (image families take
        none). `negative`: the negative conditioning of x's rows when the caller has it, else made here if needed."""
        if negative is None and guidance.needs_negative:
            negative = self._negative(x.shape[0])
        extra = {"guidance_scale_2": guidance.scale_2} if guidance.scale_2 is not None else {}
        return self.family.velocity(transformer, x, sigma, cond, guidance.scale, negative, **extra)

    # ------------------------------------------------------------------ hooks
    def _load_extra_models(self, transformer: torch.nn.Module, args: DiffusionTrainingConfig) -> None:
        """Load what else lives on the base before the student is added (DiffusionOPD: the teachers)."""

    def _add_auxiliary_adapters(self, transformer: torch.nn.Module, args: DiffusionTrainingConfig) -> None:
        """Add frozen adapters derived from the student once it exists (DiffusionNFT: the old policy)."""

    def _place_models(self, device: torch.device) -> None:
        """Move extra modules to `device` once the Trainer has chosen it."""

    def _default_guidance(self, adapter: str | None) -> float:
        """CFG scale `generate` uses for `adapter` when the caller gives none."""
        return self.args.guidance_scale

    def _model_card_details(self) -> dict[str, Any]:
        """What the model card says about this algorithm: `summary` (markdown, follows "This is a LoRA adapter for
        <base>,"), `teachers` and `rewards` (table rows), `tags` (extra metadata tags), `settings` (rows of the
        training table), `steps_label` (the name of the optimizer-step row) and `papers` (dicts with `title`, `id`,
        `citation`)."""
        return {"summary": f"trained with **{self._name}**.", "settings": {}, "papers": [self._paper]}

    # ------------------------------------------------------------------ set-up
    def _add_student(self, transformer, peft_config: LoraConfig | None, args: DiffusionTrainingConfig) -> LoraConfig:
        if self._student_spec is not None:
            spec = self._student_spec
            folder = spec.local_dir
            owner = f"`student_adapter` '{spec.display}'"
            experts = list(self.family.experts)
            parts = {e: read_lora_folder(folder, expert_weight_name(e, spec.weight_name), owner) for e in experts}
            peft_config = lora_config_for(*parts[experts[0]])
            # one file per expert (`expert_weight_name`); keys prefixed as in `denoiser` when there are several
            several = len(experts) > 1
            state_dict = {
                (f"{e}." if several else "") + k: v for e, (part, _) in parts.items() for k, v in part.items()
            }
            add_adapter(transformer, peft_config, STUDENT)
            set_peft_model_state_dict(transformer, state_dict, adapter_name=STUDENT)
        else:
            peft_config = copy.deepcopy(peft_config) if peft_config is not None else default_lora_config(self.family)
            add_adapter(transformer, peft_config, STUDENT)
        self._freeze_all_but_student(transformer)
        # LoRA weights train in float32 even on a bf16/fp16 base.
        cast_training_params(transformer, torch.float32)
        return peft_config

    @staticmethod
    def _freeze_all_but_student(transformer) -> None:
        for name, param in transformer.named_parameters():
            param.requires_grad_(f".{STUDENT}." in name)

    @property
    def student_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if f".{STUDENT}." in n]

    def create_optimizer(self, model=None):
        # The optimizer holds the student only: peft's set_adapter can flip other adapters to trainable.
        trainable = {id(p) for p in self.student_parameters}
        for name, param in (model or self.model).named_parameters():
            if param.requires_grad and id(param) not in trainable:
                raise RuntimeError(f"Parameter {name} is trainable but is not part of the student adapter.")
        return super().create_optimizer(model)

    def _clip_grad_norm(self, model):
        # Single process: clip the student's parameters (the only ones with gradients, in the model's order: the
        # same norm to the bit) rather than `model.parameters()`, a walk over every teacher's modules.
        grads = getattr(self, "_student_grads", None)
        if self.accelerator.distributed_type != DistributedType.NO or grads is None or model is not grads.model:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(grads.parameters, self.args.max_grad_norm)

    def get_train_dataloader(self) -> DataLoader:
        rounds = RoundRobinPrompts(
            self.task_prompts, self.args.per_device_train_batch_size, self.accelerator.num_processes, self.args.seed
        )
        loader = DataLoader(rounds, batch_size=1, sampler=SequentialSampler(rounds), collate_fn=lambda items: items[0])
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------ sampling
    def _generator(self, *keys: Any) -> torch.Generator:
        """A generator seeded by (seed, keys): rollouts are a function of the step, so resuming is exact."""
        digest = hashlib.sha256(repr((self.args.seed, *keys)).encode()).digest()
        seed = int.from_bytes(digest[:8], "little") % (2**63)
        return torch.Generator(device="cpu").manual_seed(seed)

    def _negative(self, batch: int) -> Cond:
        return cond_tile(self.prompt_cache([self.args.negative_prompt]), batch)

    @torch.no_grad()
    def rollout(
        self,
        cond: Cond,
        generator: torch.Generator,
        guidance_scale: float | None = None,
        log_prob_reduction: str = "sum",
        cps_log_prob: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sample the student's trajectory with no grad, with the configured sampler (`noise_level`, `sde_type`).

        Args:
            cond: Conditioning, one row per trajectory.
            generator: Draws the initial latents and the SDE noise.
            guidance_scale: CFG scale; `None` uses `args.guidance_scale`.
            log_prob_reduction: `"sum"` (the true log-density) or `"mean"` (per latent element).
            cps_log_prob: When given, the log-probs are `transition.step_log_prob` in this CPS convention
                (`"flow_grpo"` or `"gaussian"`, per latent element) and `log_prob_reduction` is ignored.

        Returns:
            `states` `(N + 1, B, ...)` float32 (x_{t_0}..x_{t_N}), `sigmas` `(N + 1,)`, and for stochastic samplers
            `log_probs` `(N, B)` of the sampled transitions and their `means` `(N, B, ...)`.
        """
        args = self.args
        state = self._rollout_begin(cond, generator, guidance_scale, keep_states=True)
        log_probs, means = [], []
        transformer = self.accelerator.unwrap_model(self.model)
        for _ in range(args.num_inference_steps):
            x, mean, std = self._rollout_step(state, transformer)
            if args.noise_level > 0:
                if cps_log_prob is None:
                    log_probs.append(transition.gaussian_log_prob(x, mean, std, log_prob_reduction))
                else:
                    log_probs.append(transition.step_log_prob(x, mean, std, args.sde_type, cps_log_prob))
                means.append(mean)
        out = {"states": state.trajectory(), "sigmas": state.sigmas}
        if log_probs:
            out["log_probs"] = torch.stack(log_probs)
            out["means"] = torch.stack(means)
        return out

    def _rollout_begin(
        self, cond: Cond, generator: torch.Generator, guidance_scale: float | None = None, keep_states: bool = False
    ) -> RolloutState:
        """A rollout before its first step: initial latents drawn from `generator`, the schedule, the student's
        guidance (`guidance_scale` overrides its scale) and its negative conditioning; `keep_states` keeps the
        trajectory. `_rollout_step` advances it; `rollout` runs it to the end with no grad."""
        args = self.args
        guidance = self.student_guidance
        if guidance_scale is not None:
            guidance = Guidance(guidance_scale, guidance.scale_2)
        batch = next(iter(cond.values())).shape[0]
        resolution = self.resolution_for(cond)
        sigmas = self.family.sigmas(args.num_inference_steps, resolution)
        x = self.family.init_latents(batch, resolution, generator).to(args.device)
        return RolloutState(
            x=x,
            sigmas=sigmas,
            sigmas_device=to_device(sigmas, args.device),
            sigma_floats=sigmas.tolist(),
            t_guard=sigmas[1].item(),
            cond=cond,
            guidance=guidance,
            negative=self._negative(batch) if guidance.needs_negative else None,
            generator=generator,
            states=[x] if keep_states else None,
        )

    def _rollout_step(self, state: RolloutState, transformer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sampler step of the rollout `state` (from `_rollout_begin`) with `transformer`, under the caller's grad
        mode: returns `(x_next, mean, std)` like `transition.sample_step`; `mean` keeps the graph when grad is on,
        `x_next` (also stored as `state.x`, and kept in `state.states`) never does, so the next step starts from a
        detached state."""
        args = self.args
        x, j, sigmas = state.x, state.j, state.sigma_floats
        sigma = state.sigmas_device[j].expand(x.shape[0])
        v = self._velocity(transformer, x, sigma, state.cond, state.guidance, state.negative)
        noise = to_device(torch.randn(x.shape, generator=state.generator), x.device) if args.noise_level > 0 else None
        x_next, mean, std = transition.sample_step(
            x, v, sigmas[j], sigmas[j + 1], args.noise_level, args.sde_type, state.t_guard, noise=noise
        )
        x_next = x_next.detach()
        state.x, state.j = x_next, j + 1
        if state.states is not None:
            state.states.append(x_next)
        return x_next, mean, std

    def _step_rows(self, states: torch.Tensor, sigmas: torch.Tensor, steps: range):
        """Rows for a chunk of trained steps of a trajectory `states` `(N + 1, B, ...)` with schedule `sigmas`
        `(N + 1,)`: states, sigma, next sigma, all `(len(steps) * B, ...)`, step-major."""
        batch = states.shape[1]
        x = states[steps.start : steps.stop].flatten(0, 1)
        sigmas = sigmas.to(x.device)
        t = sigmas[steps.start : steps.stop].repeat_interleave(batch)
        t_next = sigmas[steps.start + 1 : steps.stop + 1].repeat_interleave(batch)
        return x, t, t_next

    def _probe_row(self) -> PromptRow | None:
        """The training row with the largest conditioning, the one `_saved_bytes_per_prompt` measures: among rows
        with input images (whose reference tokens lengthen every pass), the most images, then the most pixels;
        `None` when no row has images (any prompt will do: the embeddings' shapes do not depend on the text)."""

        def pixels(image) -> int:
            if isinstance(image, (str, os.PathLike)):  # a path: its header only
                with PIL.Image.open(image) as opened:
                    return opened.width * opened.height
            return image.width * image.height

        def size(row: PromptRow) -> tuple[int, int]:
            images = row["image"] if isinstance(row["image"], (list, tuple)) else [row["image"]]
            return len(images), sum(pixels(image) for image in images)

        rows = [row for rows in self.task_prompts.values() for row in rows if row.get("image")]
        return max(rows, key=size, default=None)

    def _saved_bytes_per_prompt(self) -> int:
        """Bytes autograd saves for one prompt's student pass at the first sampler step (CFG rows included), measured
        by one forward with grad on this device: each saved storage counted once, the model's weights not at all.
        The prompt is the training row with the largest conditioning (`_probe_row`), at its output size."""
        args = self.args
        transformer = self.accelerator.unwrap_model(self.model)
        row = self._probe_row()
        cond = self._negative(1) if row is None else self.prompt_cache([row["prompt"]], [row_images(row)])
        resolution = self.resolution_for(cond)
        x = self.family.init_latents(1, resolution, self._generator("saved-bytes")).to(args.device)
        sigma = self.family.sigmas(args.num_inference_steps, resolution)[:1].to(args.device)
        weights = {t.untyped_storage().data_ptr() for t in [*transformer.parameters(), *transformer.buffers()]}
        seen: set[int] = set()
        total = 0

        def pack(tensor):
            nonlocal total
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return tensor

        with torch.enable_grad(), self.compute_loss_context_manager():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                v = self._velocity(transformer, x, sigma, cond, self.student_guidance)
        del v
        return total

    def _chunks(self, num_steps: int):
        size = self.args.step_batch_size or num_steps
        return [range(s, min(s + size, num_steps)) for s in range(0, num_steps, size)]

    def resolution_for(self, cond: Cond) -> Resolution:
        """The output size of rows with conditioning `cond`: the one their input images ask for (editing families
        with `size_from_image`: `family.output_resolution`), else the config's `resolution`."""
        size = self.family.output_resolution(cond)
        return self.args.resolution if size is None else size

    def decode(self, x: torch.Tensor, resolution: Resolution | None = None) -> list:
        """Final latents to PIL images of `resolution` (default: the config's); the VAE visits the accelerator for
        the call (training never needs it)."""
        vae = self.pipeline.vae
        home = vae.device
        vae.to(self.args.device)
        try:
            return self.family.decode(x, self.args.resolution if resolution is None else resolution)
        finally:
            vae.to(home)

    def student_prompts(self, task: str | None, prompts: list[str]) -> list[str]:
        """The prompts the trained adapter sees for rows of `task` (as written here; DiffusionOPD applies its
        `task_prompt_templates`)."""
        return list(prompts)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        adapter: str | None = STUDENT,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        use_ema: bool = True,
        images: list | None = None,
    ) -> list:
        """Sample images with the deterministic ODE sampler, with the student (EMA weights when EMA is on), another
        adapter (its name) or the base (`adapter=None`); `images` gives each prompt's input images (editing
        families: a list of PIL images or `None`; rows whose references differ in size are sampled apart).

        Returns:
            One PIL image per prompt, of `resolution` (height x width) pixels. The same seed gives the same initial
            noise for every adapter, so images are comparable side by side.
        """
        args = self.args
        groups = self.prompt_cache.groups(prompts, images) if images is not None and any(images) else []
        if len(groups) > 1:  # references of other sizes: sampled apart (each group from the seed's noise)
            out: list = [None] * len(prompts)
            for group in groups:
                sampled = self.generate(
                    [prompts[i] for i in group],
                    adapter,
                    seed,
                    num_inference_steps,
                    guidance_scale,
                    use_ema,
                    [images[i] for i in group],
                )
                for i, sample in zip(group, sampled):
                    out[i] = sample
            return out
        steps = num_inference_steps or args.num_inference_steps
        if guidance_scale is None:
            guidance_scale = self._default_guidance(adapter)
        cond = self.prompt_cache(prompts, images)
        guidance = Guidance(guidance_scale, args.guidance_scale_2)
        negative = self._negative(len(prompts)) if guidance.needs_negative else None
        resolution = self.resolution_for(cond)
        sigmas = self.family.sigmas(steps, resolution)
        x = self.family.init_latents(len(prompts), resolution, self._generator("generate", seed)).to(args.device)
        transformer = self.accelerator.unwrap_model(self.model)
        context = self._ema_weights() if use_ema and adapter == STUDENT else contextlib.nullcontext()
        with context, self.adapters.use(adapter):
            for j in range(steps):
                sigma = sigmas[j].expand(len(prompts)).to(args.device)
                v = self._velocity(transformer, x, sigma, cond, guidance, negative)
                x = transition.step_mean(x, v, sigmas[j].item(), sigmas[j + 1].item())
        return self.decode(self.family.full_latents(x, cond), resolution)

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
            means = {key: sum(values) / len(values) for key, values in self._metrics.items() if values}
            # Metrics accumulate as device tensors (no host sync per round); one read-back here for all of them.
            tensors = [key for key, value in means.items() if isinstance(value, torch.Tensor)]
            if tensors:
                values = torch.stack([means[key].detach().float().reshape(()) for key in tensors]).tolist()
                means.update(zip(tensors, values))
            logs = {**logs, **means}
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving and resuming
    def adapter_state_dict(self, adapter: str = STUDENT) -> dict[str, torch.Tensor]:
        """An adapter's LoRA weights in PEFT naming (`...attn.to_q.lora_A.weight`), copied to the CPU."""
        model = self.accelerator.unwrap_model(self.model)
        state = get_peft_model_state_dict(model, adapter_name=adapter)
        # A copy: on CPU `.cpu()` would alias the live parameters, which the EMA context restores afterwards. Under
        # FSDP2 the weights are sharded DTensors: `full_tensor` gathers them (a collective, so every rank calls this).
        return {k: _full_tensor(v).detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student LoRA in PEFT naming (`...attn.to_q.lora_A.weight`), on CPU."""
        return self.adapter_state_dict(STUDENT)

    def save_student_lora(self, output_dir: str | os.PathLike, use_ema: bool = True) -> None:
        """Write the student adapter in diffusers' LoRA format (`pytorch_lora_weights.safetensors`) with its adapter
        metadata, loadable by `pipe.load_lora_weights(output_dir)`.

        With several experts (Wan 2.2), each expert's LoRA is its own file (`expert_weight_name`): the first expert's
        loads as above, the others with `pipe.load_lora_weights(output_dir, weight_name=
        "pytorch_lora_weights_transformer_2.safetensors", load_into_transformer_2=True)`."""
        with self._ema_weights() if use_ema else contextlib.nullcontext():
            state = self.student_state_dict()
        experts = list(self.family.experts)
        for expert in experts:
            prefix = f"{expert}." if len(experts) > 1 else ""
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            self.family.pipeline_class.save_lora_weights(
                output_dir,
                transformer_lora_layers=part,
                transformer_lora_adapter_metadata=adapter_metadata(self.peft_config),
                is_main_process=self.accelerator.is_main_process,
                weight_name=expert_weight_name(expert),
            )

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.save_student_lora(output_dir)
        # JSON rather than the Trainer's pickled `training_args.bin`: every file the package writes loads without pickle
        Path(output_dir, TRAINING_ARGS).write_text(self.args.to_json_string())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir or self.args.output_dir)

    def _extra_checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the student that resuming needs (DiffusionNFT: the old policy), saved with it."""
        return {}

    def _load_extra_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `_extra_checkpoint_state` saved (the keys not consumed by the student)."""

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is written, the Trainer's own files go to a staging folder (`checkpointing`).
        run_dir = super()._get_output_dir(trial)
        return str(staging_run_dir(run_dir, self._staging_step)) if self._staging_step is not None else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-<step> atomically: every file (the Trainer's and the package's) into a staging folder,
        then one rename once all ranks are done; older checkpoints are rotated out only after that. An I/O failure
        raises a one-line `CheckpointWriteError` and leaves the previous checkpoints as they were."""
        step = self.state.global_step
        run_dir = self._get_output_dir(trial)
        if self.args.should_save:
            remove_partial_checkpoints(run_dir)  # leftovers of a killed run
        self.accelerator.wait_for_everyone()  # no rank writes into a staging folder that is being removed
        self._staging_step, self._deferred_push = step, False
        staging = staging_run_dir(run_dir, step)
        folder = staging / f"checkpoint-{step}"
        try:
            super()._save_checkpoint(model, trial)
            # The exported adapter holds the EMA weights; resuming needs the raw training weights too. Every rank
            # gathers them (sharded weights need all ranks); the main process writes.
            state = {**self.student_state_dict(), **self._extra_checkpoint_state()}
            if self.args.should_save:
                save_file(state, str(folder / TRAINING_WEIGHTS))
                if self.ema is not None:
                    save_ema_state(self.ema.state_dict(), folder / EMA_STATE)
                self.create_model_card(output_dir=str(folder))
            self._save_checkpoint_extras(folder)
        except Exception as error:
            failure = write_error(error, staging, step)  # names the file being written: before it is removed
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if failure is None:
                raise
            raise failure from error
        finally:
            self._staging_step = None
        self.accelerator.wait_for_everyone()  # every rank's files are written
        if self.args.should_save:
            final = publish_checkpoint(run_dir, step)
            best = self.state.best_model_checkpoint
            if best is not None and Path(best) == folder:
                self.state.best_model_checkpoint = str(final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
            if self._deferred_push:
                push_checkpoint(self, str(final))
        self.accelerator.wait_for_everyone()  # no rank goes on (and may stop) before the checkpoint is in place

    def _save_checkpoint_extras(self, folder: Path) -> None:
        """Write what else a checkpoint needs into `folder` (its staging place); called on every rank."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Under FSDP the Trainer would also gather and write the whole frozen base (`pytorch_model_fsdp.bin`, the
        # size of the model) into every checkpoint; only the student trains, and `_save_checkpoint` saves it.
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(
            self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir
        )
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        folder = check_checkpoint(resume_from_checkpoint)
        model = self.accelerator.unwrap_model(model or self.model)
        state = load_file(str(folder / TRAINING_WEIGHTS))
        extra_keys = set(self._extra_checkpoint_state())
        extra = {k: v for k, v in state.items() if k in extra_keys}
        student = {k: v for k, v in state.items() if k not in extra_keys}
        result = set_peft_model_state_dict(model, _like_parameters(model, student, STUDENT), adapter_name=STUDENT)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"Checkpoint {folder} does not match the student adapter: {result.unexpected_keys[:3]}")
        self._load_extra_checkpoint_state(extra)
        ema_file = folder / EMA_STATE
        if self.ema is not None and ema_file.is_file():
            self.ema.load_state_dict(load_ema_state(ema_file))  # never unpickles code
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
            kwargs: `samples` (widget entries) and `results` (a results table, default `self.model_card_results`):
                see `hub.create_model_card`.
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
        `args.hub_model_id`; never the base, other adapters or the optimizer state.

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
        # During a checkpoint save the upload waits until the checkpoint is complete and in its final place.
        if self._staging_step is not None:
            self._deferred_push = True
            return
        push_checkpoint(self, checkpoint_folder)

    def check_resume(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """Check the checkpoint that `train(resume_from_checkpoint=...)` would resume from before anything runs, and
        return it (`None`: the run starts from step 0).

        `True` / "true": the last complete checkpoint of `output_dir` (incomplete ones are skipped); none is an
        error. "auto": the same, but with none the run starts. A folder: that checkpoint. A missing or corrupt file
        raises a one-line `ValueError` naming it."""
        folder, _ = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if folder is not None:
            check_checkpoint(folder)
        return folder

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """The Trainer's `train`, with `resume_from_checkpoint` also "auto" (see `check_resume`), `output_dir` locked
        against a second run for the duration (`OutputDirLock`), and a clean stop on SIGTERM / SIGINT: the round in
        progress ends, a checkpoint is written, and `stop_on_signal.signal_name` names the signal (the command then
        exits with 143)."""
        lock = OutputDirLock(self.args.output_dir)
        if self.args.process_index == 0:
            lock.acquire()
        try:
            folder = self.check_resume(resume_from_checkpoint)
            if folder is None and str(resume_from_checkpoint).lower() == RESUME_AUTO:
                self.accelerator.print(
                    f"No complete checkpoint in {self.args.output_dir}: starting the run from step 0 "
                    f"(`resume_from_checkpoint={RESUME_AUTO}`)."
                )
            set_seed(self.args.seed)
            # Single process: `zero_grad` after each step over the student only (`module_walks`), no walk over the
            # teachers' modules. Sharded runs keep the Trainer's own: FSDP2 replaces the parameters when it wraps the
            # model, after this list would be read (its gradients would then never be cleared).
            self._student_grads = None
            if self.accelerator.distributed_type == DistributedType.NO:
                self._student_grads = StudentGrads(self.model)
            with self._student_grads.installed() if self._student_grads else contextlib.nullcontext():
                result = super().train(folder, *args, **kwargs)
        finally:
            lock.release()
        if self.stop_on_signal.signal_name is not None:
            step = self.state.global_step
            self.accelerator.print(
                f"Stopped by {self.stop_on_signal.signal_name} after step {step}: checkpoint saved to "
                f"{os.path.join(self.args.output_dir, f'checkpoint-{step}')}; resume with the same command and "
                f'`--resume_from_checkpoint {RESUME_AUTO}` (or `train(resume_from_checkpoint="{RESUME_AUTO}")`).'
            )
        return result
