"""What the training commands share: the argument parser, one-line errors, the relaunch through `accelerate launch`,
loading the base pipeline and the prompts, `toy:<seed>` adapters, and the train-save-push job."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from trl import TrlParser

from ..data import load_prompt_dataset
from ..families.base import get_family
from ..registry import load_pipeline
from ..rewards import get_reward
from ..trainer.base_config import check_reward_names
from ..trainer.base_trainer import prompt_rows, resolve_student_adapter
from ..trainer.checkpointing import CheckpointWriteError, OutputDirBusyError, OutputDirLock
from ..trainer.model_config import DiffusionModelConfig, get_student_lora_config


PROG = "trl-diffusion-opd"
TOY_PREFIX = "toy:"
TOY_TEACHERS_DIR = "_toy_teachers"
# Stands for a toy adapter while the other specs are checked, before the base exists (a Hub id never resolved).
TOY_PLACEHOLDER = "trl-diffusion-opd/toy-adapter-not-yet-written"
# Set in the environment of a job relaunched through accelerate, so that it trains instead of relaunching again.
LAUNCHED_ENV = "TRL_DIFFUSION_OPD_LAUNCHED"


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


class DiffusionParser(TrlParser):
    """`TrlParser` whose errors are one line (not a usage dump of every flag), and whose dict- and `Any`-typed fields
    read JSON on the command line (HfArgumentParser would call `dict(text)` or `Any(text)` on them)."""

    def __init__(self, dataclass_types, prog: str):
        super().__init__(dataclass_types, prog=prog)
        hints = {name: hint for cls in self.dataclass_types for name, hint in typing.get_type_hints(cls).items()}
        dict_fields = {
            f.name for cls in self.dataclass_types for f in dataclasses.fields(cls) if _mentions_dict(hints[f.name])
        }
        for action in self._actions:
            if action.dest in dict_fields:
                action.type = _json_value

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def one_line(error: BaseException) -> str:
    """The error's message on one line (or its type when it has none)."""
    return re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__


def fail(prog: str, message: str) -> int:
    """Print `prog: error: message` to stderr and return the usage-error exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def config_path(argv: list[str]) -> str | None:
    """The `--config FILE` of `argv`, if any."""
    return argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None


# ---------------------------------------------------------------------------------------------- accelerate launch
def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {option for option in launch_command_parser()._option_string_actions if option.startswith("--")}


def _unknown_options(strings: list[str], allowed: set[str]) -> list[str]:
    return [s.split("=")[0] for s in strings if s.startswith("--") and s.split("=")[0] not in allowed]


# Where `--accelerate_config NAME` looks, first to last: this package's presets (FSDP2 and DeepSpeed ZeRO set up for a
# LoRA student on a sharded diffusion base), then TRL's (`multi_gpu`, `single_gpu`, `fsdp1`, `zero1`, ...).
ACCELERATE_PRESET_PACKAGES = ("trl_diffusion_opd.accelerate_configs", "trl.accelerate_configs")


def accelerate_presets() -> dict[str, str]:
    """`{preset name: path of its YAML file}`; a name of this package's presets hides TRL's preset of that name."""
    presets: dict[str, str] = {}
    for package in reversed(ACCELERATE_PRESET_PACKAGES):
        folder = resources.files(package)
        presets.update({p.name.removesuffix(".yaml"): str(p) for p in folder.iterdir() if p.name.endswith(".yaml")})
    return dict(sorted(presets.items()))


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """Turn `--accelerate_config PRESET_OR_PATH` into accelerate's `--config_file PATH`; a preset is a config name
    shipped with this package (`fsdp2`, `fsdp2_offload`, `zero2`, `zero3`) or with TRL (`multi_gpu`, `single_gpu`,
    `fsdp1`, `zero1`, ...)."""
    if "--accelerate_config" not in launch_args:
        return launch_args
    index = launch_args.index("--accelerate_config")
    if index + 1 >= len(launch_args):
        raise ValueError("`--accelerate_config` needs a preset name or a file.")
    value = launch_args[index + 1]
    if os.path.isfile(value):
        path = value
    else:
        presets = accelerate_presets()
        if value.removesuffix(".yaml") not in presets:
            raise ValueError(
                f"`--accelerate_config {value}` is neither a file nor a preset (presets: {list(presets)})."
            )
        path = presets[value.removesuffix(".yaml")]
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


def _relaunch(launch_args: list[str], script_argv: list[str], module: str) -> int:
    from accelerate.commands import launch

    os.environ[LAUNCHED_ENV] = "1"
    namespace = launch.launch_command_parser().parse_args([*launch_args, "--module", module, *script_argv])
    try:
        launch.launch_command(namespace)
    except subprocess.CalledProcessError as error:
        return error.returncode or 1
    return 0


# ---------------------------------------------------------------------------------------------- building blocks
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
            One prompt source (a `.txt` / `.jsonl` / data file, a dataset folder or id, an inline list, a registered
            name), or `{task: source}`; `.jsonl` metadata reaches the rewards.
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
        )


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
    Toy adapters exist for offline runs on the tiny pipelines."""
    from ..testing import save_toy_lora  # the test helpers are only loaded when a toy adapter is asked for

    def make(label: str, seed: int) -> str:
        name = re.sub(r"[^\w.-]+", "_", label)
        return str(save_toy_lora(pipeline, Path(folder) / name, seed=seed, **lora_kwargs))

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
    if os.path.isfile(name):
        return name  # a data file: `prompts_by_task` reads every supported format
    return load_prompt_dataset(name, config, split=split, name="dataset_name")


def build_rl_trainer(trainer_class: type, script_args: DiffusionRLScriptArguments, training_args, model_args):
    """The Stage-1 trainer (`FlowGRPOTrainer` or `DiffusionNFTTrainer`) of the `grpo` / `nft` commands.

    The prompts are read and the reward weights checked before the rewards and the base model are loaded."""
    train_dataset, eval_dataset = load_prompts(script_args)
    train_dataset = prompt_rows(train_dataset)
    eval_dataset = prompt_rows(eval_dataset, "eval_dataset") if eval_dataset is not None else None
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
    trainer.accelerator.print(f"Student adapter saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        dataset = script_args.dataset_name if script_args.prompts is None else None
        trainer.push_to_hub(dataset_name=dataset)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):  # transformers >= 5.18: close trackers and the process group
        trainer.end()
    return trainer


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
        allowed = _launch_options() | {"--accelerate_config"}
        unknown = _unknown_options(config_rest, allowed)
        if unknown:
            keys = ", ".join(key.removeprefix("--") for key in unknown)
            return fail(prog, f"unknown key(s) in {path}: {keys}.")
        # Left-over flags must be `accelerate launch` options; a leading bare word belongs to none.
        unknown = _unknown_options(cli_rest, allowed) or [s for s in cli_rest[:1] if not s.startswith("--")]
        if unknown:
            return fail(prog, f"unrecognized arguments: {' '.join(unknown)}.")
        launch_args = resolve_accelerate_config(config_rest + cli_rest)
    except yaml.YAMLError as error:
        return fail(prog, f"{path} is not valid YAML: {one_line(error)}")
    except (ValueError, TypeError, OSError) as error:
        return fail(prog, one_line(error))
    if launch_args and not os.environ.get(LAUNCHED_ENV):
        return _relaunch(launch_args, _without(argv, cli_rest), module)
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
