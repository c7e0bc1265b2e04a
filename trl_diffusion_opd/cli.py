"""The `trl-diffusion-opd` command, in TRL's manner.

```bash
trl-diffusion-opd train --config examples/configs/tiny.yaml              # the embedded tiny default, offline, CPU
trl-diffusion-opd train --config recipe.yaml --learning_rate 1e-4        # command-line flags override the YAML
trl-diffusion-opd train --config recipe.yaml --accelerate_config multi_gpu --num_processes 8
trl-diffusion-opd grpo --config examples/configs/tiny_grpo.yaml            # Stage 1: Flow-GRPO / GRPO-Guard teacher
trl-diffusion-opd nft --config examples/configs/tiny_nft.yaml              # Stage 1: DiffusionNFT teacher
trl-diffusion-opd env                                                    # versions, for bug reports
trl-diffusion-opd eval --config eval.yaml                                # reward table and image grids
```

`grpo` and `nft` train one reward-specific teacher (Stage 1) with `FlowGRPOTrainer` / `DiffusionNFTTrainer` on the
same machinery, their first group being `DiffusionRLScriptArguments` (`reward_funcs`, `prompts`). `train` parses three
argument groups with `trl.TrlParser`: `DiffusionOPDScriptArguments` (teachers and prompts),
`DiffusionOPDConfig` (training) and `DiffusionModelConfig` (base model and student LoRA). Dict fields (`teachers`,
`prompts`, `teacher_guidance_scale`, `task_weights`, ...) are YAML mappings in a config file and JSON objects on the
command line. Any `accelerate launch` option (`--num_processes`, `--mixed_precision`, ...) or
`--accelerate_config PRESET_OR_PATH` (a TRL preset such as `multi_gpu`, or an accelerate config file), on the command
line or in the YAML, relaunches the job through `accelerate launch`.

Two names exist for offline runs and tests: `model_name_or_path: tiny:sd3` (or `tiny:flux`) is the randomly
initialised tiny pipeline of `trl_diffusion_opd.testing`, and a teacher `toy:<seed>` is a random LoRA for that base,
written to `output_dir/_toy_teachers/<task>` (files starting with `_` are never pushed to the Hub).

Every function here is importable, so that scripts (`examples/scripts/diffusion_opd.py`) run the same job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import TrlParser


if TYPE_CHECKING:
    from .config import DiffusionOPDConfig


PROG = "trl-diffusion-opd"
TINY_MODELS = ("tiny:sd3", "tiny:flux")
WORLD_BASE = "world:base"  # the tiny world's shipped base (`trl_diffusion_opd.world`)
WORLD_PREFIX = "world:"
TOY_TEACHER_PREFIX = "toy:"
TOY_TEACHERS_DIR = "_toy_teachers"
# Set in the environment of a job relaunched through accelerate, so that it trains instead of relaunching again.
LAUNCHED_ENV = "TRL_DIFFUSION_OPD_LAUNCHED"


def _json_dict(value: Any, name: str, required: bool = False) -> dict | None:
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


@dataclass
class DiffusionOPDScriptArguments:
    """
    Teachers and prompts of the `train` command.

    Args:
        teachers (`dict[str, Any]`):
            `{task: teacher spec}`: a local folder, a Hub id `owner/repo[/sub/folder][@revision]`, a dict with `path`
            and optional `subfolder`, `revision`, `guidance_scale`, `weight`, `weight_name`, or a list of those (a
            weighted ensemble). `toy:<seed>` is a random LoRA for the tiny models.
        prompts (`dict[str, Any]` or `None`, *optional*):
            `{task: source}`, one prompt source per task: a `.txt` file (one prompt per line), a `.jsonl` file with a
            `prompt` field (other fields are kept as metadata), a `.csv`/`.json`/`.parquet` file, a local dataset
            folder, a Hub dataset id (`id:split` picks the split) or an inline list of prompts.
        dataset_name (`str` or `None`, *optional*):
            One prompt source for all tasks, with `prompt` and `task` columns: a Hub dataset id, a local dataset
            folder or a data file. Ignored when `prompts` is given.
        dataset_config (`str` or `None`, *optional*):
            Configuration of `dataset_name`.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Training split of `dataset_name`.
        dataset_test_split (`str` or `None`, *optional*):
            Split of `dataset_name` whose prompts measure the KL to the teachers in `evaluate()`.
        eval_prompts (`dict[str, Any]` or `None`, *optional*):
            Held-out prompts, in the same form as `prompts`.
    """

    teachers: dict | str | None = field(
        default=None,
        metadata={"help": "Teacher per task, a mapping (JSON on the command line): {task: spec}."},
    )
    prompts: dict | str | None = field(
        default=None,
        metadata={"help": "Prompt source per task, a mapping (JSON on the command line): {task: source}."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "One prompt source with 'prompt' and 'task' columns (Hub id, folder or file)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of `dataset_name`."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split of `dataset_name`."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Evaluation split of `dataset_name` (KL to the teachers)."}
    )
    eval_prompts: dict | str | None = field(
        default=None, metadata={"help": "Held-out prompts per task, a mapping like `prompts`."}
    )

    def __post_init__(self):
        self.teachers = _json_dict(self.teachers, "teachers", required=True)
        self.prompts = _json_dict(self.prompts, "prompts")
        self.eval_prompts = _json_dict(self.eval_prompts, "eval_prompts")
        if self.prompts is None and self.dataset_name is None:
            raise ValueError("Give the prompts: `prompts` ({task: source}) or `dataset_name` (with a 'task' column).")


@dataclass
class DiffusionRLScriptArguments:
    """
    Rewards and prompts of the `grpo` and `nft` commands.

    Args:
        reward_funcs (`list[str]`):
            Registry names of the rewards (`ocr`, `pickscore`, `geneval`, `brightness`, ...); several are summed with
            `reward_weights` (the paper's multi-task baselines).
        reward_kwargs (`dict[str, dict]` or `None`, *optional*):
            `{reward name: kwargs of get_reward}` (a device, a server `url`, model ids, ...).
        prompts (`Any`, *optional*):
            One prompt source (a `.txt` / `.jsonl` / data file, a dataset folder or id, an inline list), or
            `{task: source}`; `.jsonl` metadata reaches the rewards.
        dataset_name (`str` or `None`, *optional*):
            A prompt dataset (Hub id, folder or file) with a `prompt` column; ignored when `prompts` is given.
        dataset_config (`str` or `None`, *optional*):
            Configuration of `dataset_name`.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Training split of `dataset_name`.
        dataset_test_split (`str` or `None`, *optional*):
            Held-out split of `dataset_name`, sampled by the reward grids.
        eval_prompts (`Any`, *optional*):
            Held-out prompts, in the same forms as `prompts`.
    """

    reward_funcs: list[str] | None = field(
        default=None, metadata={"help": "Reward names from the registry (e.g. ocr pickscore brightness)."}
    )
    reward_kwargs: dict | str | None = field(
        default=None, metadata={"help": "{reward name: kwargs of get_reward}, a mapping (JSON on the command line)."}
    )
    prompts: Any = field(default=None, metadata={"help": "A prompt source, or {task: source} (JSON or YAML)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "One prompt source with a 'prompt' column (Hub id, folder or file)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of `dataset_name`."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split of `dataset_name`."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Held-out split of `dataset_name`."})
    eval_prompts: Any = field(default=None, metadata={"help": "Held-out prompts, like `prompts`."})

    def __post_init__(self):
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [name.strip() for name in self.reward_funcs.split(",") if name.strip()]
        if not self.reward_funcs:
            raise ValueError("`reward_funcs` is required: one or more reward names (e.g. `--reward_funcs ocr`).")
        self.reward_kwargs = _json_dict(self.reward_kwargs, "reward_kwargs") or {}
        for name in ("prompts", "eval_prompts"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
                setattr(self, name, json.loads(value))
        if self.prompts is None and self.dataset_name is None:
            raise ValueError("Give the prompts: `prompts` (a source or {task: source}) or `dataset_name`.")


@dataclass
class DiffusionModelConfig:
    """
    Base model and student adapter of the `train` command.

    Args:
        model_name_or_path (`str`):
            The base pipeline: a Hub id (`stabilityai/stable-diffusion-3.5-medium`), a local folder, or `tiny:sd3` /
            `tiny:flux` for the embedded tiny pipelines. Its revision and dtype are `revision` and `torch_dtype`.
        cache_dir (`str` or `None`, *optional*):
            Hub cache for the base and the teachers; `None` uses `HF_HUB_CACHE`.
        lora_r (`int`, *optional*, defaults to `32`):
            Rank of the student LoRA.
        lora_alpha (`int`, *optional*, defaults to `64`):
            Alpha of the student LoRA.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout of the student LoRA.
        lora_target_modules (`list[str]` or `None`, *optional*):
            Modules the student adapts; `None` uses the family's attention projections.
        lora_init (`str`, *optional*, defaults to `"gaussian"`):
            `init_lora_weights` of PEFT: `"gaussian"`, `"true"` (Kaiming A, zero B), `"pissa"`, ...
        use_rslora (`bool`, *optional*, defaults to `False`):
            Rank-stabilised scaling alpha/sqrt(r).
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base pipeline: Hub id, local folder, tiny:sd3 / tiny:flux, or world:base."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Hub cache for the base and the teachers."})
    lora_r: int = field(default=32, metadata={"help": "Rank of the student LoRA."})
    lora_alpha: int = field(default=64, metadata={"help": "Alpha of the student LoRA."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout of the student LoRA."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules the student adapts; default: the family's attention projections."}
    )
    lora_init: str = field(default="gaussian", metadata={"help": "PEFT's init_lora_weights."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError(f"`model_name_or_path` is required: a Hub id, a local folder, or one of {TINY_MODELS}.")


class DiffusionOPDParser(TrlParser):
    """`TrlParser` for the three argument groups, whose errors are one line (not a usage dump of every flag)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _config_class(command: str):
    # Imported here, so that `env` runs without importing transformers.
    if command == "grpo":
        from .grpo_config import FlowGRPOConfig

        return DiffusionRLScriptArguments, FlowGRPOConfig
    if command == "nft":
        from .nft_config import DiffusionNFTConfig

        return DiffusionRLScriptArguments, DiffusionNFTConfig
    from .config import DiffusionOPDConfig

    return DiffusionOPDScriptArguments, DiffusionOPDConfig


def make_parser(prog: str | None = None, command: str = "train") -> DiffusionOPDParser:
    """The parser of a training command, with `--config file.yaml`: `train` parses
    `(DiffusionOPDScriptArguments, DiffusionOPDConfig, DiffusionModelConfig)`, `grpo` and `nft`
    `(DiffusionRLScriptArguments, FlowGRPOConfig | DiffusionNFTConfig, DiffusionModelConfig)`."""
    script_class, config_class = _config_class(command)
    parser = DiffusionOPDParser((script_class, config_class, DiffusionModelConfig), prog=prog or f"{PROG} {command}")
    # HfArgumentParser would call `dict(text)` for some dict-typed fields: read JSON instead.
    dict_fields = {
        f.name
        for cls in parser.dataclass_types
        for f in dataclasses.fields(cls)
        if _mentions_dict(typing.get_type_hints(cls)[f.name])
    }
    for action in parser._actions:
        if action.dest in dict_fields:
            action.type = _json_value
    return parser


def _mentions_dict(hint: Any) -> bool:
    if hint is dict or typing.get_origin(hint) is dict:
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


# ---------------------------------------------------------------------------------------------- building blocks
def load_pipeline(model_args: DiffusionModelConfig, training_args: DiffusionOPDConfig):
    """Load the base pipeline named by `model_args.model_name_or_path` (or build a tiny one)."""
    name = model_args.model_name_or_path
    if name == WORLD_BASE:
        from .world.pipeline import load_world_pipeline

        pipeline = load_world_pipeline()
        pipeline.register_to_config(_name_or_path=name)
        return pipeline
    if name in TINY_MODELS:
        from . import testing

        build = testing.get_tiny_sd3_pipeline if name == "tiny:sd3" else testing.get_tiny_flux_pipeline
        pipeline = build(seed=0)
        pipeline.register_to_config(_name_or_path=name)
        return pipeline
    import torch
    from diffusers import DiffusionPipeline

    dtype = training_args.torch_dtype
    dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    with training_args.main_process_first(desc="loading the base pipeline"):
        return DiffusionPipeline.from_pretrained(
            name,
            torch_dtype=dtype,
            revision=training_args.revision,
            cache_dir=model_args.cache_dir,
            token=training_args.hub_token,
        )


def student_lora_config(model_args: DiffusionModelConfig, pipeline):
    """The student's `LoraConfig` from `model_args`; the targets default to the family's."""
    from peft import LoraConfig

    from .families.base import get_family

    targets = model_args.lora_target_modules or list(type(get_family(pipeline)).default_lora_targets)
    init = {"true": True, "false": False}.get(model_args.lora_init.lower(), model_args.lora_init)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        init_lora_weights=init,
        use_rslora=model_args.use_rslora,
    )


def materialize_toy_teachers(teachers: dict[str, Any], pipeline, folder: str | os.PathLike) -> dict[str, Any]:
    """Replace every `toy:<seed>` teacher (alone, as a dict's `path`, or in a list) by a random LoRA for `pipeline`,
    saved under `folder/<task>[_<index>]`. Other specs are returned unchanged."""
    from .testing import save_toy_lora

    def convert(spec: Any, label: str) -> Any:
        if isinstance(spec, list):
            return [convert(item, f"{label}_{index}") for index, item in enumerate(spec)]
        if (
            isinstance(spec, dict)
            and isinstance(spec.get("path"), str)
            and spec["path"].startswith(TOY_TEACHER_PREFIX)
        ):
            return {**spec, "path": convert(spec["path"], label)}
        if isinstance(spec, str) and spec.startswith(TOY_TEACHER_PREFIX):
            seed = spec[len(TOY_TEACHER_PREFIX) :]
            if not seed.isdigit():
                raise ValueError(f"Teacher '{label}': '{spec}' must be 'toy:<integer seed>'.")
            # Toy teachers share part of their update, as teachers RL-tuned from one base do.
            return str(
                save_toy_lora(
                    pipeline, Path(folder) / label, seed=int(seed), std=0.1, rank=2, shared_seed=0, specific_scale=0.5
                )
            )
        return spec

    return {task: convert(spec, task) for task, spec in teachers.items()}


def expand_world_teachers(teachers: dict[str, Any]) -> dict[str, Any]:
    """Replace every `world:<task>` teacher (alone, as a dict's `path`, or in a list) by the folder of the tiny
    world's shipped teacher of that task. Other specs are returned unchanged."""

    def convert(spec: Any) -> Any:
        if isinstance(spec, list):
            return [convert(item) for item in spec]
        if isinstance(spec, dict) and isinstance(spec.get("path"), str):
            return {**spec, "path": convert(spec["path"])}
        if isinstance(spec, str) and spec.startswith(WORLD_PREFIX):
            from .world.demo import shipped_teachers

            shipped = shipped_teachers()
            task = spec[len(WORLD_PREFIX) :]
            if task not in shipped:
                raise ValueError(f"Unknown world teacher '{spec}'; the world has {sorted(shipped)}.")
            return shipped[task]
        return spec

    return {task: convert(spec) for task, spec in teachers.items()}


def resolve_teachers(
    teachers: dict[str, Any], cache_dir: str | None = None, token: str | bool | None = None
) -> dict[str, list]:
    """Parse `{task: spec}` into `TeacherSpec`s and resolve each one (download from the Hub or find it in the
    cache) once, with `cache_dir` and `token`; the trainer then reuses the resolved folders."""
    from .teachers import parse_teachers, resolve_teacher
    from .trainer import STUDENT

    specs = parse_teachers(teachers, reserved=(STUDENT,))
    for task_specs in specs.values():
        for spec in task_specs:
            resolve_teacher(spec, cache_dir=cache_dir, token=token)
    return specs


def load_prompts(script_args: DiffusionOPDScriptArguments | DiffusionRLScriptArguments) -> tuple[Any, Any]:
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
    from .data import load_prompt_dataset

    if os.path.isfile(name):
        return name  # a data file: `prompts_by_task` reads every supported format
    return load_prompt_dataset(name, config, split=split, name="dataset_name")


def build_trainer(
    script_args: DiffusionOPDScriptArguments, training_args: DiffusionOPDConfig, model_args: DiffusionModelConfig
):
    """The `DiffusionOPDTrainer` that the `train` command runs."""
    from .trainer import DiffusionOPDTrainer

    pipeline = load_pipeline(model_args, training_args)
    teachers = materialize_toy_teachers(
        expand_world_teachers(script_args.teachers), pipeline, Path(training_args.output_dir) / TOY_TEACHERS_DIR
    )
    with training_args.main_process_first(desc="resolving the teachers"):
        teachers = resolve_teachers(teachers, cache_dir=model_args.cache_dir, token=training_args.hub_token)
    train_dataset, eval_dataset = load_prompts(script_args)
    return DiffusionOPDTrainer(
        model=pipeline,
        teachers=teachers,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=student_lora_config(model_args, pipeline),
    )


def build_rl_trainer(
    command: str, script_args: DiffusionRLScriptArguments, training_args, model_args: DiffusionModelConfig
):
    """The `FlowGRPOTrainer` (`grpo`) or `DiffusionNFTTrainer` (`nft`) that the command runs."""
    from .rewards import get_reward

    if command == "grpo":
        from .grpo_trainer import FlowGRPOTrainer as trainer_class
    else:
        from .nft_trainer import DiffusionNFTTrainer as trainer_class
    pipeline = load_pipeline(model_args, training_args)
    rewards = [get_reward(name, **script_args.reward_kwargs.get(name, {})) for name in script_args.reward_funcs]
    train_dataset, eval_dataset = load_prompts(script_args)
    return trainer_class(
        model=pipeline,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=student_lora_config(model_args, pipeline),
    )


def run_training(trainer, script_args: DiffusionOPDScriptArguments, training_args: DiffusionOPDConfig):
    """Train `trainer`, save the student adapter and its card, and push them when `push_to_hub`."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Student adapter saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        dataset = script_args.dataset_name if script_args.prompts is None else None
        trainer.push_to_hub(dataset_name=dataset)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):  # transformers >= 5.18: close trackers and the process group
        trainer.end()
    return trainer


def train(
    script_args: DiffusionOPDScriptArguments, training_args: DiffusionOPDConfig, model_args: DiffusionModelConfig
):
    """The `train` command's job: build the trainer, train, save, push when asked. Returns the trainer."""
    return run_training(build_trainer(script_args, training_args, model_args), script_args, training_args)


# ---------------------------------------------------------------------------------------------- commands
def _one_line(error: BaseException) -> str:
    return re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {option for option in launch_command_parser()._option_string_actions if option.startswith("--")}


def _unknown_options(strings: list[str], allowed: set[str]) -> list[str]:
    return [s.split("=")[0] for s in strings if s.startswith("--") and s.split("=")[0] not in allowed]


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """Turn `--accelerate_config PRESET_OR_PATH` into accelerate's `--config_file PATH`; a preset is a TRL-shipped
    config name such as `multi_gpu`, `single_gpu`, `zero2` or `fsdp2`."""
    if "--accelerate_config" not in launch_args:
        return launch_args
    index = launch_args.index("--accelerate_config")
    if index + 1 >= len(launch_args):
        raise ValueError("`--accelerate_config` needs a preset name or a file.")
    value = launch_args[index + 1]
    if os.path.isfile(value):
        path = value
    else:
        presets = resources.files("trl.accelerate_configs")
        candidate = presets.joinpath(f"{value}.yaml")
        if not candidate.is_file():
            names = sorted(p.name.removesuffix(".yaml") for p in presets.iterdir() if p.name.endswith(".yaml"))
            raise ValueError(f"`--accelerate_config {value}` is neither a file nor a preset (presets: {names}).")
        path = str(candidate)
    return ["--config_file", path, *launch_args[:index], *launch_args[index + 2 :]]


def _without(args: list[str], removed: list[str]) -> list[str]:
    """`args` without the tokens of `removed`, an ordered subsequence of it."""
    result, position = [], 0
    for token in args:
        if position < len(removed) and token == removed[position]:
            position += 1
        else:
            result.append(token)
    return result


def _relaunch(launch_args: list[str], script_argv: list[str], command: str = "train") -> int:
    from accelerate.commands import launch

    os.environ[LAUNCHED_ENV] = "1"
    namespace = launch.launch_command_parser().parse_args(
        [*launch_args, "--module", "trl_diffusion_opd.cli", command, *script_argv]
    )
    try:
        launch.launch_command(namespace)
    except subprocess.CalledProcessError as error:
        return error.returncode or 1
    return 0


def train_command(argv: list[str], command: str = "train") -> int:
    """`trl-diffusion-opd train|grpo|nft ARGS`: parse, then train here or relaunch through `accelerate launch`."""
    import yaml

    prog = f"{PROG} {command}"
    config_path = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    parser = make_parser(prog, command)
    try:
        *parsed, config_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        allowed = _launch_options() | {"--accelerate_config"}
        unknown = _unknown_options(config_rest, allowed)
        if unknown:
            keys = ", ".join(key.removeprefix("--") for key in unknown)
            return _fail(prog, f"unknown key(s) in {config_path}: {keys}.")
        # Left-over flags must be `accelerate launch` options; a leading bare word belongs to none.
        unknown = _unknown_options(cli_rest, allowed) or [s for s in cli_rest[:1] if not s.startswith("--")]
        if unknown:
            return _fail(prog, f"unrecognized arguments: {' '.join(unknown)}.")
        launch_args = resolve_accelerate_config(config_rest + cli_rest)
    except yaml.YAMLError as error:
        return _fail(prog, f"{config_path} is not valid YAML: {_one_line(error)}")
    except (ValueError, TypeError, OSError) as error:
        return _fail(prog, _one_line(error))
    if launch_args and not os.environ.get(LAUNCHED_ENV):
        return _relaunch(launch_args, _without(argv, cli_rest), command)
    script_args, training_args, model_args = parsed
    try:
        # Set-up errors (a teacher not found, unreadable prompts, ...) are the user's to fix: one line each.
        if command == "train":
            trainer = build_trainer(script_args, training_args, model_args)
        else:
            trainer = build_rl_trainer(command, script_args, training_args, model_args)
    except (ValueError, OSError) as error:
        return _fail(prog, _one_line(error))
    run_training(trainer, script_args, training_args)
    return 0


def environment() -> dict[str, str]:
    """Platform, Python, torch and accelerator, and the versions of the libraries a run depends on."""
    from .hub import package_versions

    info = {"platform": platform.platform(), "python": platform.python_version()}
    versions = package_versions()
    versions.pop("python")
    info["torch"] = versions.pop("torch")
    info["accelerator"] = _accelerator()
    info.update(versions)
    return info


def _accelerator() -> str:
    try:
        import torch
    except ImportError:
        return "unknown (torch is not installed)"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        backend = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
        return f"{backend}: {len(names)} x {', '.join(sorted(set(names)))}"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return f"XPU: {torch.xpu.device_count()} device(s)"
    if torch.backends.mps.is_available():
        return "MPS (Apple silicon)"
    return "none (CPU only)"


def env_command(argv: list[str]) -> int:
    """`trl-diffusion-opd env`: print the environment for bug reports."""
    if argv:
        return _fail(f"{PROG} env", f"unrecognized arguments: {' '.join(argv)}")
    lines = [f"- {name}: {value}" for name, value in environment().items()]
    print("Copy-paste the following information when reporting an issue:\n\n" + "\n".join(lines) + "\n")
    return 0


def make_eval_parser(prog: str | None = None) -> DiffusionOPDParser:
    """The parser of the `eval` command: `(DiffusionOPDEvalArguments,)`, with `--config file.yaml`."""
    from .evaluation import DiffusionOPDEvalArguments

    parser = DiffusionOPDParser((DiffusionOPDEvalArguments,), prog=prog or f"{PROG} eval")
    hints = typing.get_type_hints(DiffusionOPDEvalArguments)
    dict_fields = {f.name for f in dataclasses.fields(DiffusionOPDEvalArguments) if _mentions_dict(hints[f.name])}
    for action in parser._actions:
        if action.dest in dict_fields:
            action.type = _json_value
    return parser


def _toy_adapters(adapters: dict[str, Any], pipeline, folder: Path) -> dict[str, Any]:
    """Each `toy:<seed>` adapter (alone or as a dict's `path`) becomes a random LoRA for the tiny `pipeline`, strong
    enough (std 1) to change its images visibly, saved under `folder/<label>`."""
    from .testing import save_toy_lora

    def convert(label: str, spec: Any) -> Any:
        if isinstance(spec, dict) and isinstance(spec.get("path"), str):
            return {**spec, "path": convert(label, spec["path"])}
        if isinstance(spec, str) and spec.startswith(TOY_TEACHER_PREFIX):
            seed = spec[len(TOY_TEACHER_PREFIX) :]
            if not seed.isdigit():
                raise ValueError(f"Adapter '{label}': '{spec}' must be 'toy:<integer seed>'.")
            name = re.sub(r"[^\w.-]+", "_", label)
            return str(save_toy_lora(pipeline, folder / name, seed=int(seed), rank=4, std=1.0))
        return spec

    return {label: convert(label, spec) for label, spec in adapters.items()}


def run_evaluation(eval_args):
    """The `eval` command's job: load the base (and `toy:<seed>` adapters for the tiny models), generate, score,
    write `results.md`, `results.json` and `grids/`. Returns the `EvaluationResult`."""
    from .evaluation import evaluate_models, load_base_pipeline

    pipeline = load_base_pipeline(
        eval_args.model_name_or_path,
        torch_dtype=eval_args.torch_dtype,
        revision=eval_args.revision,
        cache_dir=eval_args.cache_dir,
        token=eval_args.hub_token,
        device=eval_args.device,
    )
    adapters = _toy_adapters(eval_args.adapters or {}, pipeline, Path(eval_args.output_dir) / "_toy_adapters")
    return evaluate_models(
        pipeline,
        prompts=eval_args.prompts,
        adapters=adapters,
        reward_kwargs=eval_args.reward_kwargs,
        include_base=eval_args.include_base,
        base_label=eval_args.base_label,
        num_inference_steps=eval_args.num_inference_steps,
        guidance_scale=eval_args.guidance_scale,
        resolution=eval_args.resolution,
        seed=eval_args.seed,
        batch_size=eval_args.batch_size,
        max_prompts=eval_args.max_prompts,
        max_sequence_length=eval_args.max_sequence_length,
        grid_size=eval_args.grid_size,
        normalization=eval_args.normalization,
        output_dir=eval_args.output_dir,
        cache_dir=eval_args.cache_dir,
        token=eval_args.hub_token,
    )


def eval_command(argv: list[str]) -> int:
    """`trl-diffusion-opd eval ARGS`: the reward table of a base model and its adapters, with image grids."""
    import yaml

    from .rewards import RewardServerError

    prog = f"{PROG} eval"
    config_path = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    parser = make_eval_parser(prog)
    try:
        eval_args, config_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except yaml.YAMLError as error:
        return _fail(prog, f"{config_path} is not valid YAML: {_one_line(error)}")
    except (ValueError, TypeError, OSError) as error:
        return _fail(prog, _one_line(error))
    if config_rest:
        keys = ", ".join(s.removeprefix("--") for s in config_rest if s.startswith("--"))
        return _fail(prog, f"unknown key(s) in {config_path}: {keys}.")
    if cli_rest:
        return _fail(prog, f"unrecognized arguments: {' '.join(cli_rest)}.")
    try:
        result = run_evaluation(eval_args)
    except (ValueError, OSError, ImportError, RewardServerError) as error:
        return _fail(prog, _one_line(error))
    print(result.to_markdown())
    print(
        f"Results: {Path(eval_args.output_dir) / 'results.md'} (and results.json); grids: {Path(eval_args.output_dir) / 'grids'}"
    )
    return 0


def _world_command(argv: list[str]) -> int:
    from .world.cli import world_command  # imported on use: the world is not on the training path

    return world_command(argv)


COMMANDS = {
    "train": (train_command, "Distil reward-specific teachers into one LoRA student (accepts --config file.yaml)."),
    "grpo": (
        lambda argv: train_command(argv, "grpo"),
        "Stage 1: train a LoRA on rewards with Flow-GRPO / GRPO-Guard (accepts --config file.yaml).",
    ),
    "nft": (
        lambda argv: train_command(argv, "nft"),
        "Stage 1: train a LoRA on rewards with DiffusionNFT (accepts --config file.yaml).",
    ),
    "eval": (eval_command, "Score a base model and its adapters on reward prompt sets; write the table and grids."),
    "world": (
        lambda argv: _world_command(argv),
        "The tiny text-to-image world: `world pretrain` (flow matching from scratch), `world eval` (reward table).",
    ),
    "env": (env_command, "Print platform, accelerator and library versions for bug reports."),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trl-diffusion-opd` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} {{{','.join(COMMANDS)}}} ...\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<8}{help_text}")
        print(f"\nRun `{PROG} COMMAND --help` for a command's options.")
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"{PROG} {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        return _fail(PROG, f"unknown command '{argv[0]}' (choose from {', '.join(COMMANDS)})")
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
