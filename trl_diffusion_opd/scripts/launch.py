"""The relaunch of a training command through `accelerate launch`: which of a command's left-over options are
accelerate's, `--accelerate_config PRESET_OR_FILE` (this package's and TRL's presets), `--num_processes N` made
data-parallel, and the relaunch itself (`relaunch`), whose job then trains instead of relaunching again."""

from __future__ import annotations

import os
import subprocess
from importlib import resources


# Set in the environment of a job relaunched through accelerate, so that it trains instead of relaunching again.
LAUNCHED_ENV = "TRL_DIFFUSION_OPD_LAUNCHED"


def launch_options() -> set[str]:
    """The `--options` of `accelerate launch`."""
    from accelerate.commands.launch import launch_command_parser

    return {option for option in launch_command_parser()._option_string_actions if option.startswith("--")}


def unknown_options(strings: list[str], allowed: set[str]) -> list[str]:
    """The `--options` of `strings` (`--x=v` as `--x`) that are not in `allowed`."""
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


# accelerate's flags that choose how processes are started; without one of them (or a config file that sets a
# distributed type) `accelerate launch --num_processes N` starts a single process.
_DISTRIBUTED_FLAGS = ("multi_gpu", "use_fsdp", "use_deepspeed", "use_megatron_lm", "tpu")


def complete_launch_args(launch_args: list[str]) -> list[str]:
    """`launch_args` that start the processes they ask for: `--num_processes N` (N > 1) alone gets `--multi_gpu`
    (data parallel: one process per GPU, or N gloo processes on a CPU), unless a config file (given, or accelerate's
    default one) or a flag already says how to distribute.

    Raises:
        ValueError: `--cpu` with `--num_processes N` (N > 1), which accelerate runs as one process.
    """
    if not launch_args:
        return launch_args
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    namespace = launch_command_parser().parse_args([*launch_args, "--module", "_"])
    if (namespace.num_processes or 1) < 2 or any(getattr(namespace, flag) for flag in _DISTRIBUTED_FLAGS):
        return launch_args
    if namespace.cpu:
        raise ValueError(
            f"`--cpu` with `--num_processes {namespace.num_processes}` runs one process in accelerate; leave out "
            "`--cpu` (a machine without GPUs then trains in that many CPU processes) or add `--accelerate_config "
            "multi_gpu`."
        )
    config_file = namespace.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    if config_file is not None and load_config_from_file(config_file).distributed_type != "NO":
        return launch_args
    return ["--multi_gpu", *launch_args]


def without_tokens(args: list[str], removed: list[str]) -> list[str]:
    """`args` without the tokens of `removed`, an ordered subsequence of it."""
    result, position = [], 0
    for token in args:
        if position < len(removed) and token == removed[position]:
            position += 1
        else:
            result.append(token)
    return result


def relaunch(launch_args: list[str], script_argv: list[str], module: str) -> int:
    """Run `python -m module script_argv` through `accelerate launch launch_args`; returns the exit code."""
    from accelerate.commands import launch

    os.environ[LAUNCHED_ENV] = "1"
    namespace = launch.launch_command_parser().parse_args([*launch_args, "--module", module, *script_argv])
    try:
        launch.launch_command(namespace)
    except subprocess.CalledProcessError as error:
        return error.returncode or 1
    return 0
