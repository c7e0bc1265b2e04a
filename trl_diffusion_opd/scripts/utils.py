"""What the training commands share: the argument parser, one-line errors, loading the base pipeline and the prompts,
`toy:<seed>` adapters, and the train-save-push job (which relaunches through `accelerate launch`: `launch.py`)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import signal
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from trl import TrlParser

from ..registry import get_pipeline, load_pipeline
from ..sizes import ResolutionLike
from . import PROG, fail, one_line, quiet_library_logs  # noqa: F401  (the commands import them from here)
from .launch import (
    LAUNCHED_ENV,
    accelerate_presets,
    complete_launch_args,
    launch_options,
    relaunch,
    resolve_accelerate_config,
    unknown_options,
    without_tokens,
)


if TYPE_CHECKING:
    from ..trainer.model_config import DiffusionModelConfig

# The modules that load models, data and rewards (torch, diffusers, datasets) are imported inside the functions that
# use them, so that a command's `--help` imports only its configurations.


TOY_PREFIX = "toy:"
TOY_TEACHERS_DIR = "_toy_teachers"
# Stands for a toy adapter while the other specs are checked, before the base exists (a Hub id never resolved).
TOY_PLACEHOLDER = "trl-diffusion-opd/toy-adapter-not-yet-written"


# ---------------------------------------------------------------------------------------------- parsing
def json_dict(value: Any, name: str, required: bool = False) -> dict | None:
    """`value` as a mapping: a dict, a JSON object string (the command line) or `None`.

    Raises:
        ValueError: `value` is not a mapping (or is missing and `required`); the message names the field `name`.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{name}` must be a mapping (a JSON object on the command line): {error}") from error
    if value is None and required:
        raise ValueError(f"`{name}` is required.")
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a mapping, got {type(value).__name__}: {value!r}")
    return value


# `--help` groups: (title, description, fields). The package's own fields that no group names land in "more options";
# transformers' TrainingArguments fields that no group names come last. A step is a round everywhere.
HELP_GROUPS = (
    (
        "model",
        "The base pipeline and the student LoRA.",
        "model_name_or_path pipeline_class revision cache_dir torch_dtype max_sequence_length family_kwargs "
        "offload_text_encoders prompt_cache_size student_adapter lora_r lora_alpha lora_dropout lora_target_modules lora_init use_rslora",
    ),
    (
        "teachers",
        "`teachers` maps each task to a spec: a local folder (relative paths in a YAML file are looked up next to the "
        "file first), a Hub id `owner/repo[/sub/folder][@revision]`, a registered name (`world:letters`), "
        "`toy:<seed>` (a random LoRA for the tiny models), a mapping with `path` and optional `subfolder`, "
        "`revision`, `guidance_scale`, `weight`, `weight_name`, or a list of those (a weighted ensemble). "
        'YAML: `teachers: {ocr: owner/repo/OCRTeacher/lora}`; command line: `--teachers \'{"ocr": "owner/repo"}\'`.',
        "teachers teacher_guidance_scale teacher_guidance_scale_2 teacher_offload max_teachers_on_device "
        "anchor_teacher anchor_weight guidance_free_student",
    ),
    (
        "prompts",
        "A prompt source is a .txt (one prompt per line), .jsonl (a `prompt` field), .csv, .json or .parquet file, a "
        "dataset folder, a Hub dataset id (`id:split`), a registered name or an inline list.",
        "prompts dataset_name dataset_config dataset_train_split dataset_test_split eval_prompts "
        "task_prompt_templates negative_prompt tasks_per_round rows_per_round task_sampling",
    ),
    ("rewards", None, "reward_funcs reward_kwargs reward_weights scale_rewards"),
    (
        "rollout",
        "How the student samples the trajectories it is trained on.",
        "num_inference_steps noise_level sde_type sampler guidance_scale guidance_scale_2 resolution num_frames "
        "timestep_fraction task_timestep_fraction step_batch_size fused_rollout num_generations generation_batch_size",
    ),
    (
        "loss",
        None,
        "loss_type kl_normalization query_mode query_sigma_range task_weights ppo_clip_range num_iterations beta clip_range adv_clip_max "
        "ratio_normalization grpo_guard_bias cps_log_prob drop_zero_std_groups nft_beta old_policy_decay_rate "
        "old_policy_max_decay",
    ),
    (
        "optimisation",
        "A step (`max_steps`, `save_steps`, `eval_steps`, `logging_steps`) is a round: a rollout on every task's "
        "prompts and one optimizer step.",
        "max_steps learning_rate per_device_train_batch_size gradient_accumulation_steps lr_scheduler_type "
        "warmup_steps weight_decay max_grad_norm seed gradient_checkpointing ema ema_decay ema_update_interval",
    ),
    ("evaluation", None, "eval_rewards eval_strategy eval_steps per_device_eval_batch_size"),
    (
        "output",
        "`output_dir` is relative to the working directory (as in transformers), also in a YAML file.",
        "output_dir save_strategy save_steps save_total_limit logging_steps report_to run_name resume_from_checkpoint "
        "push_to_hub hub_model_id hub_token",
    ),
)

LAUNCH_HELP = (
    "`--accelerate_config PRESET_OR_FILE` (a preset: {presets}; or an accelerate config file) and any `accelerate "
    "launch` option (`--num_processes N`, `--mixed_precision bf16`, `--main_process_port`, ...), on the command line "
    "or as YAML keys, relaunch the job through `accelerate launch`. `--num_processes N` alone starts N data-parallel "
    "processes (one per GPU, or N CPU processes)."
)

DESCRIPTION = (
    "Options come from `--config FILE.yaml` (keys are the option names below) and from the command line, which "
    "overrides the file; relative paths of prompt files, teacher folders and `student_adapter` in a YAML file are "
    "looked up next to the file first, then in the working directory. Mappings are YAML mappings in the file and "
    "JSON objects on the command line. Start from examples/configs/{example} (offline, CPU)."
)

# Fields that hold local paths (or a source that may be one), resolved from a YAML file's folder.
PATH_FIELDS = ("prompts", "eval_prompts", "dataset_name", "teachers", "student_adapter", "model_name_or_path")


class DiffusionParser(TrlParser):
    """`TrlParser` whose errors are one line (not a usage dump of every flag), whose dict- and `Any`-typed fields
    read JSON on the command line (HfArgumentParser would call `dict(text)` or `Any(text)` on them), whose `--help`
    lists the package's options first, grouped, and which resolves relative paths of a YAML file from its folder."""

    def __init__(self, dataclass_types, prog: str, example: str | None = None):
        # `example`: the tiny config of a training command (which also takes launch options), under examples/configs.
        launch = " [--accelerate_config PRESET] [ACCELERATE LAUNCH OPTIONS]" if example else ""
        super().__init__(
            dataclass_types,
            prog=prog,
            usage=f"{prog} [--config FILE.yaml] [OPTIONS]{launch}",
            description=DESCRIPTION.format(example=example) if example else None,
            allow_abbrev=False,  # as TRL's CLI: `--learning_rat` is an error, not a silent `--learning_rate`
        )
        self._config_dir: Path | None = None
        self.example = example
        hints = {name: hint for cls in self.dataclass_types for name, hint in typing.get_type_hints(cls).items()}
        dict_fields = {
            f.name for cls in self.dataclass_types for f in dataclasses.fields(cls) if _mentions_dict(hints[f.name])
        }
        # Sizes (`resolution`) reach the dataclass as the text ("480x832"), which it parses; HfArgumentParser would
        # pick one member of the union (a tuple) and call it on the text.
        size_fields = {name for name, hint in hints.items() if hint == ResolutionLike}
        for action in self._actions:
            if action.dest in dict_fields:
                action.type = _json_value
            elif action.dest in size_fields:
                action.type = str
        self._group_help()

    def _group_help(self) -> None:
        """Move the options into the `HELP_GROUPS` (help text only: parsing does not depend on groups)."""
        # The fields of transformers' dataclasses (`TrainingArguments`), found without importing transformers here.
        inherited = {
            f.name
            for cls in self.dataclass_types
            for base in cls.__mro__
            if base.__module__.split(".")[0] == "transformers" and dataclasses.is_dataclass(base)
            for f in dataclasses.fields(base)
        }
        own = [f.name for cls in self.dataclass_types for f in dataclasses.fields(cls) if f.name not in inherited]
        actions: dict[str, list] = {}  # a bool that defaults to True has two flags, `--x` and `--no_x`
        for action in self._optionals._group_actions:
            actions.setdefault(action.dest, []).append(action)
        groups = []
        for title, description, names in HELP_GROUPS:
            group = self.add_argument_group(title, description)
            for name in names.split():
                group._group_actions.extend(actions.pop(name, []))
            groups.append(group)
        more = self.add_argument_group("more options of trl-diffusion-opd")
        for name in own:
            more._group_actions.extend(actions.pop(name, []))
        if self.example:
            groups.append(
                self.add_argument_group("launch", LAUNCH_HELP.format(presets=", ".join(accelerate_presets())))
            )
        self._optionals._group_actions[:] = [action for group in actions.values() for action in group]
        self._optionals.title = "transformers' TrainingArguments" if inherited else "options"
        self._action_groups = [*groups, more, self._optionals]

    def option_names(self) -> list[str]:
        """Every option's name without dashes (for "did you mean")."""
        return [action.dest for action in self._actions if action.option_strings]

    def parse_args_and_config(self, args=None, *more, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        path = config_path(args)
        self._config_dir = Path(path).parent if path else None
        return super().parse_args_and_config(args, *more, **kwargs)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        if self._config_dir is not None:
            kwargs = resolve_config_paths(kwargs, self._config_dir)
        return super().set_defaults_with_config(**kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def resolve_config_paths(config: dict[str, Any], folder: str | os.PathLike) -> dict[str, Any]:
    """`config` (a YAML file's mapping) with the relative paths of its `PATH_FIELDS` that exist under `folder` (the
    file's folder) made absolute; other values (Hub ids, registered names, paths that exist only from the working
    directory, `output_dir`) are unchanged. Prompt sources: a `{task: source}` value or one source, never the items
    of an inline prompt list; teachers: a spec, a mapping's `path`, or the items of an ensemble list."""

    def path(value: Any) -> Any:
        if not isinstance(value, str) or not value.strip() or os.path.isabs(os.path.expanduser(value)):
            return value
        candidate = Path(folder) / value
        return str(candidate) if candidate.exists() else value

    def teacher(spec: Any) -> Any:
        if isinstance(spec, list):
            return [teacher(item) for item in spec]
        if isinstance(spec, dict) and "path" in spec:
            return {**spec, "path": path(spec["path"])}
        return path(spec)

    resolved = dict(config)
    for name in PATH_FIELDS:
        value = resolved.get(name)
        if name == "teachers" and isinstance(value, dict):
            resolved[name] = {task: teacher(spec) for task, spec in value.items()}
        elif name in ("prompts", "eval_prompts") and isinstance(value, dict):
            resolved[name] = {task: path(source) for task, source in value.items()}
        elif value is not None:
            resolved[name] = path(value)
    return resolved


def did_you_mean(names: list[str], known: list[str]) -> str:
    """` (did you mean a, b?)` for the names that are close to a known one, else an empty string."""
    close = [match for name in names for match in difflib.get_close_matches(name, known, n=1)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _mentions_dict(hint: Any) -> bool:
    # `Any` fields (a prompt source or {task: source}) read JSON too: argparse cannot call `Any` on the text.
    if hint is dict or hint is Any or typing.get_origin(hint) is dict:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_mentions_dict(arg) for arg in typing.get_args(hint))
    return False


def _json_value(text: str) -> Any:
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string; the dataclass validates it


def config_path(argv: list[str]) -> str | None:
    """The `--config FILE` of `argv`, if any."""
    return argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None


# ---------------------------------------------------------------------------------------------- building blocks
@dataclass
class DiffusionRLScriptArguments:
    """
    Rewards and prompts of the `grpo` and `nft` commands; each field is documented by its `help`.
    """

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Registry names of the rewards (ocr, pickscore, geneval, brightness, ...); several are summed "
            "with `reward_weights` (the paper's multi-task baselines)."
        },
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of `get_reward` per reward, a mapping (JSON on the command line) {reward "
            "name: kwargs}: a device, a server `url`, model ids, ..."
        },
    )
    prompts: Any = field(
        default=None,
        metadata={
            "help": "One prompt source (a .txt / .jsonl / data file, a dataset folder or id, an inline list, a "
            "registered name), or {task: source} (JSON or YAML); .jsonl metadata reaches the rewards."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A prompt dataset (Hub id, folder or file) with a 'prompt' column; ignored when `prompts` is "
            "given."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) name of the `dataset_name` dataset."}
    )
    dataset_train_split: str = field(
        default="train", metadata={"help": "Split of `dataset_name` whose prompts are trained on."}
    )
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Held-out split of `dataset_name`, sampled by the reward grids."}
    )
    eval_prompts: Any = field(default=None, metadata={"help": "Held-out prompts, in the same forms as `prompts`."})

    def __post_init__(self):
        from ..rewards import parse_reward_spec
        from ..trainer.config_checks import check_reward_names

        if isinstance(self.reward_funcs, str):
            self.reward_funcs = parse_reward_spec(self.reward_funcs, "reward_funcs")
        if isinstance(self.reward_funcs, dict):
            raise ValueError("`reward_funcs` is one list of reward names for every task, not {task: rewards}.")
        if not self.reward_funcs:
            raise ValueError("`reward_funcs` is required: one or more reward names (e.g. `--reward_funcs ocr`).")
        check_reward_names("reward_funcs", self.reward_funcs)
        self.reward_kwargs = json_dict(self.reward_kwargs, "reward_kwargs") or {}
        for reward, kwargs in self.reward_kwargs.items():
            if reward not in self.reward_funcs:
                raise ValueError(
                    f"`reward_kwargs` names reward '{reward}', which is not in `reward_funcs` {self.reward_funcs}."
                )
            if not isinstance(kwargs, dict):
                raise ValueError(
                    f"`reward_kwargs['{reward}']` must be a mapping of keyword arguments, got {kwargs!r}."
                )
        for name in ("prompts", "eval_prompts"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"`{name}` starts like JSON but is not valid JSON ({error}): {value!r}"
                    ) from error
        if self.prompts is None and self.dataset_name is None:
            raise ValueError("Give the prompts: `prompts` (a source or {task: source}) or `dataset_name`.")


def check_resolution(pipeline, training_args) -> None:
    """`training_args.resolution` fits the pipeline's latent layout and `training_args.family_kwargs` are options of
    its family (the trainer checks both too; the commands check them before writing toy adapters, so that a failed
    start leaves nothing on disk)."""
    from ..families.base import get_family

    get_family(pipeline, training_args.family_kwargs).check_resolution(training_args.resolution)


def load_base(model_args: DiffusionModelConfig, training_args):
    """Load the base pipeline named by `model_args.model_name_or_path` (a Hub id, a folder or a registered name)."""
    with training_args.main_process_first(desc="loading the base pipeline"):
        return load_pipeline(
            model_args.model_name_or_path,
            torch_dtype=training_args.torch_dtype,
            revision=training_args.revision,
            cache_dir=model_args.cache_dir,
            token=training_args.hub_token,
            pipeline_class=model_args.pipeline_class,
        )


def _config_reader(name: str, revision: str | None, cache_dir: str | None, token) -> Callable[[str | None], dict]:
    """`config(component)`: `name`'s `model_index.json` (`None`) or `<component>/config.json`, from a folder or the
    Hub, without any weight."""

    def config(component: str | None) -> dict:
        filename = "config.json" if component else "model_index.json"
        if os.path.isdir(name):
            path = Path(name, component or "", filename)
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(
                name, filename, subfolder=component, revision=revision, cache_dir=cache_dir, token=token
            )
        return json.loads(Path(path).read_text())

    return config


def check_before_loading(
    name: str,
    resolution,
    num_frames: int | None,
    datasets: list[dict[str, list] | None],
    pipeline_class: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    what: str = "Task",
) -> None:
    """What the family of base `name` refuses from its configs alone (a size or frame count the model cannot run, a
    row without the input frame an image-to-video model needs, ...: `FlowMatchingFamily.check_before_loading`), as one
    line naming the row (`{what} '<task>' row <i>`), before any weight loads. `datasets` are `{task: rows}` (or
    `None`). A registered base is built in memory, and one whose configs cannot be read reports that when it loads:
    both are checked by the trainer (or the pipeline) instead."""
    import diffusers

    from ..families.base import family_class

    if get_pipeline(name) is not None:
        return
    config = _config_reader(name, revision, cache_dir, token)
    rows = [
        (f"{what} '{task}' row {index} ({row['prompt']!r})", row)
        for dataset in datasets
        for task, task_rows in (dataset or {}).items()
        for index, row in enumerate(task_rows)
    ]
    try:
        class_name = pipeline_class or config(None).get("_class_name")
        family = family_class(getattr(diffusers, str(class_name), None) or type(None))
        if family is not None:
            family.check_before_loading(config, resolution, num_frames, rows)
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return


def _map_toy_specs(specs: dict[str, Any], what: str, make: Callable[[str, int], str]) -> dict[str, Any]:
    """`specs` with every `toy:<seed>` spec (alone, as a dict's `path`, or in a list) replaced by `make(label, seed)`;
    a seed that is not an integer raises a `ValueError` naming the `what` (`Teacher`, `Adapter`) and its label."""

    def convert(spec: Any, label: str) -> Any:
        if isinstance(spec, list):
            return [convert(item, f"{label}_{index}") for index, item in enumerate(spec)]
        if isinstance(spec, dict) and isinstance(spec.get("path"), str) and spec["path"].startswith(TOY_PREFIX):
            return {**spec, "path": convert(spec["path"], label)}
        if isinstance(spec, str) and spec.startswith(TOY_PREFIX):
            seed = spec[len(TOY_PREFIX) :]
            if not seed.isdigit():
                raise ValueError(f"{what} '{label}': '{spec}' must be 'toy:<integer seed>'.")
            return make(label, int(seed))
        return spec

    return {label: convert(spec, label) for label, spec in specs.items()}


def toy_placeholders(specs: dict[str, Any], what: str = "Teacher") -> dict[str, Any]:
    """`specs` with every `toy:<seed>` replaced by `TOY_PLACEHOLDER`, a spec that parses (as a Hub id) but is never
    resolved: the other specs can be parsed and checked before the base model that toy adapters need is loaded."""
    return _map_toy_specs(specs, what, lambda label, seed: TOY_PLACEHOLDER)


def materialize_toy_adapters(
    specs: dict[str, Any], pipeline, folder: str | os.PathLike, what: str = "Teacher", **lora_kwargs
) -> dict[str, Any]:
    """Replace every `toy:<seed>` spec (alone, as a dict's `path`, or in a list) by a random LoRA for `pipeline`
    (`testing.save_toy_lora(**lora_kwargs)`), saved under `folder/<label>[_<index>]`; other specs are unchanged.
    With several experts (Wan 2.2 A14B) the LoRA has a file for each, like a teacher trained on that base.
    Toy adapters exist for offline runs on the tiny pipelines."""
    from ..families.base import get_family
    from ..testing import save_toy_lora  # the test helpers are only loaded when a toy adapter is asked for

    experts = list(get_family(pipeline).experts)

    def make(label: str, seed: int) -> str:
        name = re.sub(r"[^\w.-]+", "_", label)
        for expert in experts:
            save_toy_lora(pipeline, Path(folder) / name, seed=seed, expert=expert, **lora_kwargs)
        return str(Path(folder) / name)

    return _map_toy_specs(specs, what, make)


def load_prompts(script_args) -> tuple[Any, Any]:
    """`(train_dataset, eval_dataset)` for the trainer from the script arguments."""
    if script_args.prompts is not None:
        train = script_args.prompts
    else:
        train = _load_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    evaluation = script_args.eval_prompts
    if evaluation is None and script_args.dataset_test_split and script_args.dataset_name:
        evaluation = _load_split(script_args.dataset_name, script_args.dataset_config, script_args.dataset_test_split)
    return train, evaluation


def _load_split(name: str, config: str | None, split: str) -> Any:
    from ..data import load_prompt_dataset

    if os.path.isfile(name):
        return name  # a data file: `prompts_by_task` reads every supported format
    return load_prompt_dataset(name, config, split=split, name="dataset_name")


def build_rl_trainer(trainer_class: type, script_args: DiffusionRLScriptArguments, training_args, model_args):
    """The Stage-1 trainer (`FlowGRPOTrainer` or `DiffusionNFTTrainer`) of the `grpo` / `nft` commands.

    The prompts are read and the reward weights checked before the rewards and the base model are loaded."""
    from ..rewards import get_reward
    from ..trainer.base_trainer import check_eval_strategy, prompt_rows, resolve_student_adapter
    from ..trainer.model_config import get_student_lora_config

    train_dataset, eval_dataset = load_prompts(script_args)
    train_dataset = prompt_rows(train_dataset)
    eval_dataset = prompt_rows(eval_dataset, "eval_dataset") if eval_dataset is not None else None
    check_eval_strategy(training_args, eval_dataset)
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(script_args.reward_funcs):
        raise ValueError(
            f"`reward_weights` has {len(weights)} values for {len(script_args.reward_funcs)} reward functions "
            f"({script_args.reward_funcs})."
        )
    with training_args.main_process_first(desc="resolving the student adapter"):
        resolve_student_adapter(training_args.student_adapter, model_args.cache_dir, training_args.hub_token)
    rewards = [get_reward(name, **script_args.reward_kwargs.get(name, {})) for name in script_args.reward_funcs]
    pipeline = load_base(model_args, training_args)
    return trainer_class(
        model=pipeline,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_student_lora_config(model_args, pipeline),
    )


def run_training(trainer, script_args, training_args):
    """Train `trainer`, save the student adapter and its card, and push them when `push_to_hub`."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.stop_on_signal.signal_name is not None:
        return trainer  # preempted: the checkpoint is written and the run is not over
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(saved_message(training_args.output_dir, getattr(trainer, "base_model_id", None)))
    if training_args.push_to_hub:
        dataset = script_args.dataset_name if script_args.prompts is None else None
        trainer.push_to_hub(dataset_name=dataset)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):  # transformers >= 5.18: close trackers and the process group
        trainer.end()
    return trainer


def saved_message(output_dir: str | os.PathLike, base: str | None = None) -> str:
    """Where the student adapter and its card are, and the lines that load it on `base` (a Hub id, a folder or a
    registered name, whose quick-start code is used)."""
    from ..lora_io import DIFFUSERS_LORA_WEIGHTS

    folder = Path(output_dir).resolve()
    named = get_pipeline(base) if base else None
    if named is not None and named.quickstart:
        load = named.quickstart.replace("\n\n", "\n")
    else:
        load = f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{base or "BASE"}")'
    lines = [*load.splitlines(), f'pipe.load_lora_weights("{folder}")']
    return (
        f"Saved the student adapter to {folder / DIFFUSERS_LORA_WEIGHTS} and its model card to "
        f"{folder / 'README.md'}. Load it with:\n" + "\n".join(f"    {line}" for line in lines)
    )


def training_main(argv: list[str], command: str, parser: DiffusionParser, build: Callable, module: str) -> int:
    """A training command: parse `argv` (with `--config file.yaml`), relaunch through `accelerate launch` when
    launch options are given, else `build(script_args, training_args, model_args)` the trainer and run it.
    Set-up errors (bad values, a teacher not found, unreadable prompts) print one line and return 2."""
    prog = f"{PROG} {command}"
    path = config_path(argv)
    try:
        *parsed, config_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        allowed = launch_options() | {"--accelerate_config"}
        known = parser.option_names() + sorted(option.removeprefix("--") for option in allowed)
        unknown = unknown_options(config_rest, allowed)
        if unknown:
            keys = [key.removeprefix("--") for key in unknown]
            return fail(prog, f"unknown key(s) in {path}: {', '.join(keys)}{did_you_mean(keys, known)}.")
        # Left-over flags must be `accelerate launch` options; a leading bare word belongs to none.
        unknown = unknown_options(cli_rest, allowed) or [s for s in cli_rest[:1] if not s.startswith("--")]
        if unknown:
            hint = did_you_mean([flag.removeprefix("--") for flag in unknown], known).replace("mean ", "mean --")
            return fail(prog, f"unrecognized arguments: {' '.join(unknown)}{hint}.")
        launch_args = complete_launch_args(resolve_accelerate_config(config_rest + cli_rest))
    except yaml.YAMLError as error:
        return fail(prog, f"{path} is not valid YAML: {one_line(error)}")
    except (ValueError, TypeError, OSError) as error:
        if path is None and not any(arg.startswith("--") and arg not in ("--help", "-h") for arg in argv):
            # Nothing given at all: the missing field is not the problem, the missing configuration is.
            return fail(
                prog,
                f"{one_line(error)} Give a configuration: `{prog} --config FILE.yaml` (try "
                f"examples/configs/{parser.example} of the repository, offline on a CPU); `{prog} --help` lists the "
                "options.",
            )
        return fail(prog, one_line(error))
    if launch_args and not os.environ.get(LAUNCHED_ENV):
        return relaunch(launch_args, without_tokens(argv, cli_rest), module)
    from ..trainer.checkpointing import OutputDirBusyError, OutputDirLock

    script_args, training_args, model_args = parsed
    # Held from before the toy adapters are written into output_dir until the final adapter is saved.
    lock = OutputDirLock(training_args.output_dir)
    try:
        if training_args.process_index == 0:
            lock.acquire()
    except (OSError, OutputDirBusyError) as error:
        return fail(prog, one_line(error))
    code = None
    try:
        code = _train_locked(prog, build, script_args, training_args, model_args)
        return code
    finally:
        if training_args.process_index == 0:
            lock.release(remove=code == 2)  # a start that failed on its input leaves nothing, the lock included


def _train_locked(prog: str, build: Callable, script_args, training_args, model_args) -> int:
    from ..trainer.checkpointing import CheckpointWriteError

    try:
        trainer = build(script_args, training_args, model_args)
        trainer.check_resume(training_args.resume_from_checkpoint)
    except (ValueError, OSError) as error:
        return fail(prog, one_line(error))
    try:
        run_training(trainer, script_args, training_args)
    except CheckpointWriteError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 1
    stopped = trainer.stop_on_signal.signal_name
    # 128 + the signal (143 for SIGTERM), as if it had ended the process: the job is not done, and a requeue loop
    # (`until trl-diffusion-opd ... --resume_from_checkpoint auto; do :; done`) must not take it for success.
    return 128 + signal.Signals[stopped].value if stopped is not None else 0
