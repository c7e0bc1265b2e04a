"""Bad input fails in one line, before any compute, through the CLI (`prog: error: ...`, exit 2) and the Python API
(`ValueError` with the same text): every config field that has a constraint and every file a user hands over.

Config-level cases never load a model (`load_pipeline` and `DiffusionPipeline.from_pretrained` raise if called);
file-level cases fail before the base is loaded too, except the resolution, which needs the family (tiny SD3), and
which must fail before toy teachers are written. Nothing is written under `output_dir` by a failed start.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from trl_diffusion_opd import (
    DiffusionModelConfig,
    DiffusionNFTConfig,
    DiffusionOPDConfig,
    DiffusionOPDTrainer,
    FlowGRPOConfig,
    cli,
    registry,
)
from trl_diffusion_opd.families.sd3 import SD3Family
from trl_diffusion_opd.rewards import RemoteReward, RewardServerError
from trl_diffusion_opd.scripts import utils as script_utils
from trl_diffusion_opd.scripts.eval import DiffusionOPDEvalArguments
from trl_diffusion_opd.scripts.train import DiffusionOPDScriptArguments
from trl_diffusion_opd.scripts.utils import DiffusionRLScriptArguments


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
YAML = {"train": CONFIGS / "tiny.yaml", "grpo": CONFIGS / "tiny_grpo.yaml", "nft": CONFIGS / "tiny_nft.yaml"}
CONFIG_CLASS = {"train": DiffusionOPDConfig, "grpo": FlowGRPOConfig, "nft": DiffusionNFTConfig}
REWARDS_PREFIX = "available rewards: "
RESOLUTION_ERROR = (
    "`resolution` must be an integer >= 1 or a [height, width] pair of them (480x832 on the command line), got {}."
)


def _forbidden(*args, **kwargs):
    raise AssertionError("a model was loaded or compute started for input that should have been refused")


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    """Every case must fail before the first sampler step or optimizer step."""
    monkeypatch.setattr(SD3Family, "velocity", _forbidden)
    monkeypatch.setattr(DiffusionOPDTrainer, "training_step", _forbidden)


@pytest.fixture
def no_model(monkeypatch):
    """...and, unless it needs the model, before any model is loaded."""
    monkeypatch.setattr(registry, "load_pipeline", _forbidden)
    monkeypatch.setattr(script_utils, "load_pipeline", _forbidden)
    monkeypatch.setattr("trl_diffusion_opd.evaluation.load_pipeline", _forbidden)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", _forbidden)


def _cli(command: str, args: list[str], capsys) -> tuple[int, str]:
    """Run `trl-diffusion-opd <command> ...` in-process; returns (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main([command, *args])
    except SystemExit as exit_info:  # argparse's own errors (types, choices) exit
        code = exit_info.code
    return code, capsys.readouterr().err


def _assert_one_line(err: str, prog: str, message: str, exact: bool) -> None:
    assert err.count("\n") == 1, err
    line = err.rstrip("\n")
    expected = f"{prog}: error: {message}"
    assert line == expected if exact else line.startswith(expected), f"\n{line}\n{expected}"


def _assert_message(error: BaseException, message: str, exact: bool) -> None:
    text = str(error)
    assert "\n" not in text
    assert text == message if exact else text.startswith(message), f"\n{text}\n{message}"


# ---------------------------------------------------------------------------------------------- config fields
@dataclass
class Case:
    """A bad value: its command-line flags, the same value in Python (`kwargs` of `target`), and the message."""

    command: str
    flags: list[str] | None  # None: not expressible on the command line (argparse's choices / types catch it)
    kwargs: dict[str, Any]
    message: str
    target: str = "config"  # config | model | script
    exact: bool = True
    id: str = field(default="")


CONFIG_CASES = [
    # The table
    Case(
        "train",
        ["--per_device_train_batch_size", "0"],
        {"per_device_train_batch_size": 0},
        "`per_device_train_batch_size` must be an integer >= 1, got 0.",
    ),
    Case(
        "train",
        ["--learning_rate", "-1"],
        {"learning_rate": -1.0},
        "`learning_rate` must be a finite number > 0, got -1.0.",
    ),
    Case(
        "train",
        ["--task_weights", '{"shapes": NaN}'],
        {"task_weights": {"shapes": float("nan")}},
        "`task_weights['shapes']` must be a finite number >= 0, got nan.",
    ),
    # TrainingArguments fields the package relies on
    Case(
        "train",
        ["--learning_rate", "inf"],
        {"learning_rate": float("inf")},
        "`learning_rate` must be a finite number > 0, got inf.",
    ),
    Case(
        "train",
        ["--gradient_accumulation_steps", "0"],
        {"gradient_accumulation_steps": 0},
        "`gradient_accumulation_steps` must be an integer >= 1, got 0.",
    ),
    Case(
        "train",
        ["--max_steps", "0"],
        {"max_steps": 0},
        "`max_steps` must be an integer >= 1, or -1 to train for `num_train_epochs`, got 0.",
    ),
    Case(
        "train",
        ["--max_steps", "-1", "--num_train_epochs", "0"],
        {"max_steps": -1, "num_train_epochs": 0.0},
        "`num_train_epochs` must be a finite number > 0, got 0.0.",
    ),
    Case(
        "train",
        ["--weight_decay", "-0.1"],
        {"weight_decay": -0.1},
        "`weight_decay` must be a finite number >= 0, got -0.1.",
    ),
    Case(
        "train",
        ["--max_grad_norm", "nan"],
        {"max_grad_norm": float("nan")},
        "`max_grad_norm` must be a finite number >= 0 or None, got nan.",
    ),
    Case(
        "train", ["--adam_beta1", "1"], {"adam_beta1": 1.0}, "`adam_beta1` must be a finite number in [0, 1), got 1.0."
    ),
    Case(
        "train",
        ["--adam_beta2", "-0.5"],
        {"adam_beta2": -0.5},
        "`adam_beta2` must be a finite number in [0, 1), got -0.5.",
    ),
    Case(
        "train",
        ["--adam_epsilon=-1e-8"],
        {"adam_epsilon": -1e-8},
        "`adam_epsilon` must be a finite number >= 0, got -1e-08.",
    ),
    Case("train", ["--seed", "-1"], {"seed": -1}, "`seed` must be an integer >= 0, got -1."),
    Case("train", ["--seed", str(2**32)], {"seed": 2**32}, "`seed` must be an integer in [0, 2**32), got 4294967296."),
    # DiffusionTrainingConfig
    Case(
        "train",
        ["--num_inference_steps", "0"],
        {"num_inference_steps": 0},
        "`num_inference_steps` must be an integer >= 1, got 0.",
    ),
    Case(
        "train",
        ["--noise_level", "-0.1"],
        {"noise_level": -0.1},
        "`noise_level` must be a finite number >= 0, got -0.1.",
    ),
    Case(
        "train",
        ["--noise_level", "nan"],
        {"noise_level": float("nan")},
        "`noise_level` must be a finite number >= 0, got nan.",
    ),
    Case("train", None, {"sde_type": "ode"}, "`sde_type` must be one of ('sde', 'cps'), got 'ode'."),
    Case(
        "train",
        ["--guidance_scale", "-1"],
        {"guidance_scale": -1.0},
        "`guidance_scale` must be a finite number >= 0, got -1.0.",
    ),
    Case("train", None, {"negative_prompt": 3}, "`negative_prompt` must be a string, got 3."),
    Case("train", ["--resolution", "0"], {"resolution": 0}, RESOLUTION_ERROR.format("0")),
    Case("train", ["--resolution", "48x0"], {"resolution": [48, 0]}, RESOLUTION_ERROR.format("[48, 0]")),
    Case(
        "train",
        ["--timestep_fraction", "0"],
        {"timestep_fraction": 0.0},
        "`timestep_fraction` must be a finite number in (0, 1], got 0.0.",
    ),
    Case(
        "train",
        ["--timestep_fraction", "1.5"],
        {"timestep_fraction": 1.5},
        "`timestep_fraction` must be a finite number in (0, 1], got 1.5.",
    ),
    Case(
        "train",
        ["--step_batch_size", "0"],
        {"step_batch_size": 0},
        "`step_batch_size` must be an integer >= 1 or None, got 0.",
    ),
    Case("train", ["--ema_decay", "1"], {"ema_decay": 1.0}, "`ema_decay` must be a finite number in [0, 1), got 1.0."),
    Case(
        "train",
        ["--ema_update_interval", "0"],
        {"ema_update_interval": 0},
        "`ema_update_interval` must be an integer >= 1, got 0.",
    ),
    Case(
        "train",
        ["--prompt_cache_size", "0"],
        {"prompt_cache_size": 0},
        "`prompt_cache_size` must be an integer >= 1, got 0.",
    ),
    Case(
        "train",
        ["--max_sequence_length", "0"],
        {"max_sequence_length": 0},
        "`max_sequence_length` must be an integer >= 1 or None, got 0.",
    ),
    Case(
        "train",
        None,
        {"torch_dtype": "float64"},
        "`torch_dtype` must be one of ('auto', 'bfloat16', 'float16', 'float32'), got 'float64'.",
    ),
    Case(
        "train",
        ["--eval_rewards", "nope"],
        {"eval_rewards": "nope"},
        f"`eval_rewards` names unknown reward(s) ['nope']; {REWARDS_PREFIX}",
        exact=False,
    ),
    Case(
        "train",
        ["--eval_rewards", "{bad"],
        {"eval_rewards": "{bad"},
        "`eval_rewards` is not valid JSON (Expecting property name enclosed in double quotes",
        exact=False,
    ),
    Case(
        "train",
        ["--eval_rewards", '{"shapes": 3}'],
        {"eval_rewards": {"shapes": 3}},
        "`eval_rewards['shapes']` must be a reward name or a list of them, got 3.",
    ),
    Case("train", None, {"ema": "no"}, "`ema` must be True or False, got 'no'."),
    Case("train", None, {"offload_text_encoders": 1}, "`offload_text_encoders` must be True or False, got 1."),
    Case("train", None, {"teacher_offload": "yes"}, "`teacher_offload` must be True or False, got 'yes'."),
    Case("train", None, {"use_rslora": "yes"}, "`use_rslora` must be True or False, got 'yes'.", target="model"),
    # DiffusionOPDConfig
    Case(
        "train",
        ["--task_weights", '{"shapes": "heavy"}'],
        {"task_weights": {"shapes": "heavy"}},
        "`task_weights['shapes']` must be a finite number >= 0, got 'heavy'.",
    ),
    Case(
        "train",
        ["--task_weights", '{"shapes": -1}'],
        {"task_weights": {"shapes": -1}},
        "`task_weights['shapes']` must be a finite number >= 0, got -1.",
    ),
    Case(
        "train",
        ["--task_weights", "[1, 2]"],
        {"task_weights": [1, 2]},
        "`task_weights` must be a dict, got list: [1, 2]",
    ),
    Case(
        "train",
        ["--teacher_guidance_scale", '{"text": "x"}'],
        {"teacher_guidance_scale": {"text": "x"}},
        "`teacher_guidance_scale['text']` must be a finite number >= 0, got 'x'.",
    ),
    Case(
        "train",
        ["--teacher_guidance_scale", "abc"],
        {"teacher_guidance_scale": "abc"},
        "`teacher_guidance_scale` must be a number or {task: number}, got 'abc'.",
    ),
    Case(
        "train",
        ["--teacher_guidance_scale", "inf"],
        {"teacher_guidance_scale": float("inf")},
        "`teacher_guidance_scale` must be a finite number >= 0 or None, got inf.",
    ),
    Case("train", None, {"loss_type": "l2"}, "`loss_type` must be one of ('kl', 'ppo'), got 'l2'."),
    Case(
        "train",
        None,
        {"kl_normalization": "nope"},
        "`kl_normalization` must be one of ('paper', 'reference'), got 'nope'.",
    ),
    Case(
        "train",
        ["--loss_type", "ppo"],
        {"loss_type": "ppo"},
        "`loss_type='ppo'` needs a stochastic sampler: set `noise_level > 0` (the ODE has no log-probability).",
    ),
    Case(
        "train",
        ["--noise_level", "0.5", "--loss_type", "ppo", "--ppo_clip_range", "0"],
        {"noise_level": 0.5, "loss_type": "ppo", "ppo_clip_range": 0.0},
        "`ppo_clip_range` must be a finite number > 0 or None, got 0.0.",
    ),
    # DiffusionModelConfig
    Case("train", ["--lora_r", "0"], {"lora_r": 0}, "`lora_r` must be an integer >= 1, got 0.", target="model"),
    Case(
        "train",
        ["--lora_alpha", "-8"],
        {"lora_alpha": -8},
        "`lora_alpha` must be a finite number > 0, got -8.",
        target="model",
    ),
    Case(
        "train",
        ["--lora_dropout", "1"],
        {"lora_dropout": 1.0},
        "`lora_dropout` must be a finite number in [0, 1), got 1.0.",
        target="model",
    ),
    Case(
        "train",
        ["--lora_init", "bogus"],
        {"lora_init": "bogus"},
        "`lora_init` must be one of ['true', 'false', ",
        target="model",
        exact=False,
    ),
    Case(
        "train",
        None,
        {"lora_target_modules": []},
        "`lora_target_modules` must be a non-empty list of module names (e.g. to_q to_k to_v) or None, got [].",
        target="model",
    ),
    Case(
        "train",
        None,
        {"model_name_or_path": None},
        "`model_name_or_path` is required: a Hub id, a local folder, or a registered name such as tiny:sd3.",
        target="model",
    ),
    # DiffusionOPDScriptArguments
    Case(
        "train",
        ["--prompts", "{bad"],
        {"teachers": {"a": "x"}, "prompts": "{bad"},
        "`prompts` must be a mapping (a JSON object on the command line): Expecting property name",
        target="script",
        exact=False,
    ),
    Case(
        "train",
        ["--teachers", "[1]"],
        {"teachers": [1], "prompts": {"a": ["p"]}},
        "`teachers` must be a mapping, got list: [1]",
        target="script",
    ),
    # DiffusionRLConfig, FlowGRPOConfig, DiffusionNFTConfig
    Case(
        "grpo",
        ["--num_generations", "1"],
        {"num_generations": 1},
        "`num_generations` must be >= 2 (advantages compare the images of one prompt), got 1.",
    ),
    Case(
        "grpo",
        ["--generation_batch_size", "0"],
        {"generation_batch_size": 0},
        "`generation_batch_size` must be an integer >= 1 or None, got 0.",
    ),
    Case("grpo", ["--num_iterations", "0"], {"num_iterations": 0}, "`num_iterations` must be an integer >= 1, got 0."),
    Case(
        "grpo",
        ["--reward_weights", "[1, NaN]"],
        {"reward_weights": [1, float("nan")]},
        "`reward_weights[1]` must be a finite number, got nan.",
    ),
    Case(
        "grpo",
        ["--reward_weights", "[]"],
        {"reward_weights": []},
        "`reward_weights` must be a non-empty list of numbers, got [].",
    ),
    Case(
        "grpo", ["--adv_clip_max", "0"], {"adv_clip_max": 0.0}, "`adv_clip_max` must be a finite number > 0, got 0.0."
    ),
    Case("grpo", ["--beta", "-1"], {"beta": -1.0}, "`beta` must be a finite number >= 0, got -1.0."),
    Case(
        "grpo", None, {"scale_rewards": "std"}, "`scale_rewards` must be one of ('group', 'batch', 'none'), got 'std'."
    ),
    Case(
        "grpo",
        ["--noise_level", "0"],
        {"noise_level": 0.0},
        "`noise_level` must be > 0 for Flow-GRPO (the ODE sampler has no log-probability), got 0.0.",
    ),
    Case("grpo", ["--clip_range", "0"], {"clip_range": 0.0}, "`clip_range` must be a finite number > 0, got 0.0."),
    Case(
        "grpo",
        None,
        {"ratio_normalization": "guard"},
        "`ratio_normalization` must be one of ('none', 'grpo_guard'), got 'guard'.",
    ),
    Case("nft", ["--nft_beta", "0"], {"nft_beta": 0.0}, "`nft_beta` must be a finite number > 0, got 0.0."),
    Case(
        "nft",
        ["--old_policy_decay_rate", "-0.1"],
        {"old_policy_decay_rate": -0.1},
        "`old_policy_decay_rate` must be a finite number >= 0, got -0.1.",
    ),
    Case(
        "nft",
        ["--old_policy_max_decay", "1"],
        {"old_policy_max_decay": 1.0},
        "`old_policy_max_decay` must be a finite number in [0, 1), got 1.0.",
    ),
    Case("nft", None, {"sampler": "dpm"}, "`sampler` must be one of ('euler', 'heun'), got 'dpm'."),
    Case(
        "nft",
        ["--noise_level", "0.5"],
        {"noise_level": 0.5},
        "DiffusionNFT samples with a deterministic sampler: `noise_level` must be 0, got 0.5.",
    ),
    # DiffusionRLScriptArguments
    Case(
        "grpo",
        ["--reward_funcs", "nope"],
        {"reward_funcs": ["nope"], "prompts": ["a"]},
        f"`reward_funcs` names unknown reward(s) ['nope']; {REWARDS_PREFIX}",
        target="script",
        exact=False,
    ),
    Case(
        "grpo",
        ["--reward_kwargs", '{"ocr": {}}'],
        {"reward_funcs": ["brightness"], "reward_kwargs": {"ocr": {}}, "prompts": ["a"]},
        "`reward_kwargs` names reward 'ocr', which is not in `reward_funcs` ['brightness'].",
        target="script",
    ),
    Case(
        "grpo",
        ["--reward_kwargs", '{"brightness": 3}'],
        {"reward_funcs": ["brightness"], "reward_kwargs": {"brightness": 3}, "prompts": ["a"]},
        "`reward_kwargs['brightness']` must be a mapping of keyword arguments, got 3.",
        target="script",
    ),
    Case(
        "grpo",
        ["--prompts", "[bad"],
        {"reward_funcs": ["brightness"], "prompts": "[bad"},
        "`prompts` starts like JSON but is not valid JSON (Expecting value",
        target="script",
        exact=False,
    ),
]


def _case_id(case: Case) -> str:
    key = next(iter(case.kwargs)) if case.target != "script" else "script"
    return f"{case.command}-{key}-{re.sub(r'[^A-Za-z0-9.-]+', '_', str(case.kwargs.get(key, case.flags)))[:20]}"


def _python(case: Case, output_dir: Path):
    if case.target == "model":
        return DiffusionModelConfig(**{"model_name_or_path": "tiny:sd3", **case.kwargs})
    if case.target == "script":
        script_class = DiffusionOPDScriptArguments if case.command == "train" else DiffusionRLScriptArguments
        return script_class(**case.kwargs)
    return CONFIG_CLASS[case.command](output_dir=str(output_dir), **case.kwargs)


@pytest.mark.parametrize("case", CONFIG_CASES, ids=_case_id)
def test_bad_config_value_is_one_line_before_loading(case, tmp_path, capsys, no_model):
    output_dir = tmp_path / "out"
    if case.flags is not None:
        code, err = _cli(
            case.command,
            ["--config", str(YAML[case.command]), "--max_steps", "1", "--output_dir", str(output_dir), *case.flags],
            capsys,
        )
        assert code == 2
        _assert_one_line(err, f"trl-diffusion-opd {case.command}", case.message, case.exact)
    with pytest.raises(ValueError) as error:
        _python(case, output_dir)
    _assert_message(error.value, case.message, case.exact)
    assert not output_dir.exists()


def test_choices_are_refused_by_the_parser_too(tmp_path, capsys, no_model):
    code, err = _cli("train", ["--config", str(YAML["train"]), "--sde_type", "ode"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "argument --sde_type/--sde-type: invalid choice: 'ode' (choose from 'sde', 'cps')" in err


def test_output_dir_that_is_a_file(tmp_path, capsys, no_model):
    file = tmp_path / "base.yaml"
    file.write_text("x: 1\n")
    message = f"`output_dir` must be a folder, but '{file}' is an existing file."
    code, err = _cli("train", ["--config", str(YAML["train"]), "--output_dir", str(file)], capsys)
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", message, exact=True)
    with pytest.raises(ValueError) as error:
        DiffusionOPDConfig(output_dir=str(file))
    _assert_message(error.value, message, exact=True)
    assert file.read_text() == "x: 1\n"
    with pytest.raises(ValueError, match=re.escape(f"`cache_dir` must be a folder, but '{file}' is an existing file")):
        DiffusionModelConfig(model_name_or_path="tiny:sd3", cache_dir=str(file))


def test_yaml_value_of_the_wrong_type(tmp_path, capsys, no_model):
    config = tmp_path / "bad.yaml"
    config.write_text(YAML["train"].read_text().replace("resolution: 32", "resolution: [32, 32, 32]"))
    code, err = _cli("train", ["--config", str(config), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", RESOLUTION_ERROR.format("[32, 32, 32]"), True)
    config.write_text("teachers: {a: [unclosed\n")
    code, err = _cli("train", ["--config", str(config)], capsys)
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", f"{config} is not valid YAML: ", exact=False)


# ---------------------------------------------------------------------------------------------- eval arguments
EVAL_CASES = [
    (["--resolution", "0"], {"resolution": 0}, RESOLUTION_ERROR.format("0")),
    (["--max_prompts", "0"], {"max_prompts": 0}, "`max_prompts` must be an integer >= 1 or None, got 0."),
    (["--seed", "-3"], {"seed": -3}, "`seed` must be an integer >= 0, got -3."),
    (
        ["--guidance_scale", "nan"],
        {"guidance_scale": float("nan")},
        "`guidance_scale` must be a finite number >= 0, got nan.",
    ),
    (["--base_label", " "], {"base_label": " "}, "`base_label` must be a non-empty string, got ' '."),
    (
        ["--normalization", '{"brightness": [1, 0]}'],
        {"normalization": {"brightness": [1, 0]}},
        "`normalization['brightness'][1]` must be a finite number > 1, got 0.",
    ),
    (
        ["--normalization", '{"brightness": 1}'],
        {"normalization": {"brightness": 1}},
        "`normalization['brightness']` must be [low, high], got 1.",
    ),
    (
        ["--reward_kwargs", '{"brightness": 1}'],
        {"reward_kwargs": {"brightness": 1}},
        "`reward_kwargs['brightness']` must be a mapping of keyword arguments, got 1.",
    ),
    (["--family_kwargs", "[1]"], {"family_kwargs": [1]}, "`family_kwargs` must be a mapping, got list: [1]"),
    (
        ["--prompts", '{"nope@x": ["a"]}'],
        {"prompts": {"nope@x": ["a"]}},
        f"`prompts` names unknown reward(s) ['nope']; {REWARDS_PREFIX}",
    ),
]


@pytest.mark.parametrize(("flags", "kwargs", "message"), EVAL_CASES, ids=[c[0][0] for c in EVAL_CASES])
def test_bad_eval_argument_is_one_line_before_loading(flags, kwargs, message, tmp_path, capsys, no_model):
    output_dir = tmp_path / "eval"
    base = {"model_name_or_path": "tiny:sd3", "prompts": {"brightness": ["a"]}, "output_dir": str(output_dir)}
    argv = [f"--{key}={json.dumps(value) if isinstance(value, dict) else value}" for key, value in base.items()]
    code, err = _cli("eval", [*argv, *flags], capsys)
    assert code == 2
    exact = REWARDS_PREFIX not in message
    _assert_one_line(err, "trl-diffusion-opd eval", message, exact)
    with pytest.raises(ValueError) as error:
        DiffusionOPDEvalArguments(**{**base, **kwargs})
    _assert_message(error.value, message, exact)
    assert not output_dir.exists()


def test_eval_option_the_family_lacks_is_one_line(tmp_path, capsys):
    output_dir = tmp_path / "eval"
    argv = ["--model_name_or_path=tiny:sd3", '--prompts={"brightness": ["a"]}', f"--output_dir={output_dir}"]
    code, err = _cli("eval", [*argv, "--family_kwargs", '{"auto_resize": false}'], capsys)
    assert code == 2
    _assert_one_line(
        err, "trl-diffusion-opd eval", "`family_kwargs` has no option 'auto_resize' for the sd3 family", False
    )
    assert not output_dir.exists()


# ---------------------------------------------------------------------------------------------- files
LORA_KEYS = ("transformer_blocks.0.attn.to_q.lora_A.weight", "transformer_blocks.0.attn.to_q.lora_B.weight")


def _lora_weights() -> dict[str, torch.Tensor]:
    return {LORA_KEYS[0]: torch.zeros(2, 32), LORA_KEYS[1]: torch.zeros(32, 2)}


def _adapter(folder: Path, kind: str) -> tuple[Path, str]:
    """A malformed adapter folder of `kind`; returns it and the message after `Teacher 'shapes': `."""
    folder.mkdir(parents=True)
    diffusers_file = folder / "pytorch_lora_weights.safetensors"
    peft_file, peft_config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if kind == "not_safetensors":
        diffusers_file.write_bytes(b"this is not a safetensors file at all")
        return folder, f"{diffusers_file} is not a valid safetensors file (SafetensorError: "
    if kind == "truncated":
        save_file(_lora_weights(), str(diffusers_file))
        diffusers_file.write_bytes(diffusers_file.read_bytes()[:-40])
        return folder, f"{diffusers_file} is not a valid safetensors file (SafetensorError: "
    if kind == "empty":
        save_file({}, str(diffusers_file))
        return folder, f"{diffusers_file} is an empty adapter: it has no tensors."
    if kind == "not_lora":
        save_file({"weight": torch.zeros(2)}, str(diffusers_file))
        return folder, f"{diffusers_file} is an empty adapter: its 1 tensor(s) are not LoRA weights, e.g. ['weight']."
    if kind == "no_weights":
        return folder, (
            f"{folder} holds no LoRA: expected 'pytorch_lora_weights.safetensors' (diffusers format) or "
            "'adapter_config.json' + 'adapter_model.safetensors' (PEFT format)."
        )
    save_file(_lora_weights(), str(peft_file))
    if kind == "peft_not_json":
        peft_config.write_text("{r: 2,")
        return folder, (
            f"{peft_config} is not valid JSON (JSONDecodeError: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1))."
        )
    if kind == "peft_not_object":
        peft_config.write_text("[2, 4]")
        return folder, f"{peft_config} is not a JSON object: '[2, 4]'."
    if kind == "peft_bad_rank":
        peft_config.write_text(json.dumps({"r": "two", "lora_alpha": 2, "target_modules": ["to_q"]}))
        return (
            folder,
            f"{peft_config} is not a valid LoRA config (ValueError: 'r' must be an integer >= 1, got 'two').",
        )
    raise AssertionError(kind)


ADAPTER_KINDS = [
    "not_safetensors",
    "truncated",
    "empty",
    "not_lora",
    "no_weights",
    "peft_not_json",
    "peft_not_object",
    "peft_bad_rank",
]


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_malformed_teacher_adapter_names_teacher_and_file(kind, tmp_path, capsys, no_model):
    folder, problem = _adapter(tmp_path / "teacher", kind)
    message = f"Teacher 'shapes': {problem}"
    exact = problem.endswith(".")
    output_dir = tmp_path / "out"
    teachers = json.dumps({"shapes": str(folder), "text": "toy:2"})
    code, err = _cli(
        "train", ["--config", str(YAML["train"]), "--output_dir", str(output_dir), "--teachers", teachers], capsys
    )
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", message, exact)
    assert not output_dir.exists()  # no toy teacher was written for 'text'

    # The Python API checks the files before it loads the base (a model id here).
    with pytest.raises(ValueError) as error:
        DiffusionOPDTrainer(
            "some/base-model",
            teachers={"shapes": str(folder)},
            args=DiffusionOPDConfig(output_dir=str(output_dir), report_to="none"),
            train_dataset={"shapes": ["a red circle"]},
        )
    _assert_message(error.value, message, exact)
    assert not output_dir.exists()


def test_malformed_student_adapter_fails_before_loading(tmp_path, capsys, no_model):
    folder, problem = _adapter(tmp_path / "student", "not_safetensors")
    message = f"`student_adapter` '{folder}': {problem}"
    code, err = _cli(
        "train",
        ["--config", str(YAML["train"]), "--output_dir", str(tmp_path / "out"), "--student_adapter", str(folder)],
        capsys,
    )
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", message, exact=False)
    code, err = _cli(
        "grpo",
        ["--config", str(YAML["grpo"]), "--output_dir", str(tmp_path / "out"), "--student_adapter", str(folder)],
        capsys,
    )
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd grpo", message, exact=False)
    assert not (tmp_path / "out").exists()


def test_malformed_eval_adapter_fails_before_loading(tmp_path, capsys, no_model):
    folder, problem = _adapter(tmp_path / "adapter", "empty")
    output_dir = tmp_path / "eval"
    argv = [
        "--model_name_or_path",
        "tiny:sd3",
        "--prompts",
        '{"brightness": ["a"]}',
        "--output_dir",
        str(output_dir),
        "--adapters",
        json.dumps({"mine": str(folder), "toy": "toy:1"}),
    ]
    code, err = _cli("eval", argv, capsys)
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd eval", f"Adapter 'mine': {problem}", exact=True)
    assert not output_dir.exists()


def _prompt_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A malformed prompt file; returns it and the message after `task 'shapes': `."""
    if kind == "txt_not_utf8":
        path = tmp_path / "prompts.txt"
        path.write_bytes(b"a red circle\n\xff\xfe a blue square\n")
        return path, f"{path} line 2 is not UTF-8 text (invalid start byte)."
    if kind == "txt_empty":
        path = tmp_path / "prompts.txt"
        path.write_text("\n  \n")
        return path, f"prompt file '{path}' has no prompts (one per line)."
    path = tmp_path / "prompts.jsonl"
    if kind == "jsonl_bad_json":
        path.write_text('{"prompt": "a"}\n\n{"prompt": "b",\n')
        return path, f"{path} line 3 is not valid JSON: Expecting property name enclosed in double quotes"
    if kind == "jsonl_no_prompt":
        path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
        return path, f"{path} line 2 has no string 'prompt' field: '{{\"text\": \"b\"}}'"
    if kind == "missing":
        return path, f"prompt file '{path}' does not exist."
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["txt_not_utf8", "txt_empty", "jsonl_bad_json", "jsonl_no_prompt", "missing"])
def test_malformed_prompt_file_names_task_path_and_line(kind, tmp_path, capsys, no_model):
    path, problem = _prompt_file(tmp_path, kind)
    message = f"task 'shapes': {problem}"
    exact = kind != "jsonl_bad_json"
    output_dir = tmp_path / "out"
    prompts = json.dumps({"shapes": str(path), "text": ["a sign"]})
    code, err = _cli(
        "train", ["--config", str(YAML["train"]), "--output_dir", str(output_dir), "--prompts", prompts], capsys
    )
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", message, exact)
    code, err = _cli(
        "grpo",
        [
            "--config",
            str(YAML["grpo"]),
            "--output_dir",
            str(output_dir),
            "--prompts",
            json.dumps({"shapes": str(path)}),
        ],
        capsys,
    )
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd grpo", message, exact)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    with pytest.raises(ValueError) as error:
        DiffusionOPDTrainer(
            "some/base-model",
            teachers={"shapes": str(teacher)},
            args=DiffusionOPDConfig(output_dir=str(output_dir), report_to="none"),
            train_dataset={"shapes": str(path)},
        )
    _assert_message(error.value, message, exact)
    assert not output_dir.exists()


def test_eval_prompts_task_without_teacher(tmp_path, capsys, no_model):
    message = "`eval_prompts` task(s) ['zzz'] have no teacher; teachers are given for ['shapes', 'text']."
    output_dir = tmp_path / "out"
    code, err = _cli(
        "train",
        ["--config", str(YAML["train"]), "--output_dir", str(output_dir), "--eval_prompts", '{"zzz": ["a"]}'],
        capsys,
    )
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", message, exact=True)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    with pytest.raises(ValueError) as error:
        DiffusionOPDTrainer(
            "some/base-model",
            teachers={"shapes": str(teacher), "text": str(teacher)},
            args=DiffusionOPDConfig(output_dir=str(output_dir), report_to="none"),
            train_dataset={"shapes": ["a"], "text": ["b"]},
            eval_dataset={"zzz": ["a"]},
        )
    _assert_message(error.value, message, exact=True)
    assert not output_dir.exists()


def test_task_weights_that_train_nothing_or_name_unknown_tasks(tmp_path, capsys, no_model):
    flags = ["--config", str(YAML["train"]), "--output_dir", str(tmp_path / "out")]
    code, err = _cli("train", [*flags, "--task_weights", '{"shapes": 0, "text": 0}'], capsys)
    assert code == 2
    _assert_one_line(
        err,
        "trl-diffusion-opd train",
        "`task_weights` gives every task weight 0 ({'shapes': 0, 'text': 0}): nothing would be trained.",
        exact=True,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("task_weights", {"shapez": 1.0}),
        ("task_timestep_fraction", {"shapez": 0.5}),
        ("task_prompt_templates", {"shapez": "{prompt}, pretty"}),
        ("teacher_guidance_scale", {"shapez": 1.0}),
        ("teacher_guidance_scale_2", {"shapez": 1.0}),
        ("eval_rewards", {"shapez": ["brightness"]}),
    ],
)
def test_per_task_field_naming_a_task_without_teacher(name, value, tmp_path, capsys, no_model):
    """A `{task: value}` entry for a task that has no teacher would be ignored without a word (a typo)."""
    message = f"`{name}` names task(s) ['shapez'], which have no teacher; teachers are given for ['shapes', 'text']."
    output_dir = tmp_path / "out"
    flags = ["--config", str(YAML["train"]), "--output_dir", str(output_dir), f"--{name}", json.dumps(value)]
    code, err = _cli("train", flags, capsys)
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", message, exact=True)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    with pytest.raises(ValueError) as error:
        DiffusionOPDTrainer(
            "some/base-model",
            teachers={"shapes": str(teacher), "text": str(teacher)},
            args=DiffusionOPDConfig(output_dir=str(output_dir), report_to="none", **{name: value}),
            train_dataset={"shapes": ["a"], "text": ["b"]},
        )
    _assert_message(error.value, message, exact=True)
    assert not output_dir.exists()


def _checkpoint(folder: Path, kind: str) -> tuple[Path, str]:
    """A checkpoint folder with one problem; returns it and the message."""
    if kind == "missing":
        return folder, (
            f"`resume_from_checkpoint` must be a checkpoint folder (e.g. output_dir/checkpoint-100), but '{folder}' "
            "does not exist."
        )
    folder.mkdir(parents=True)
    weights = folder / "student_training_weights.safetensors"
    if kind == "no_weights":
        return folder, (
            f"`resume_from_checkpoint`: {folder} is not a checkpoint of this package (no "
            "student_training_weights.safetensors)."
        )
    if kind == "corrupt_weights":
        weights.write_bytes(b"\x00" * 3)
        return folder, f"`resume_from_checkpoint`: {weights} is not a valid safetensors file ("
    save_file(_lora_weights(), str(weights))
    if kind == "corrupt_state":
        (folder / "trainer_state.json").write_text('{"global_step": ')
        return folder, f"`resume_from_checkpoint`: {folder / 'trainer_state.json'} is not valid JSON ("
    if kind == "truncated_optimizer":
        torch.save({"state": {}}, folder / "optimizer.pt")
        (folder / "optimizer.pt").write_bytes((folder / "optimizer.pt").read_bytes()[:50])
        return folder, (
            f"`resume_from_checkpoint`: {folder / 'optimizer.pt'} is truncated or not a file written by torch.save."
        )
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "no_weights", "corrupt_weights", "corrupt_state", "truncated_optimizer"])
def test_bad_resume_checkpoint(kind, tmp_path, capsys, no_model):
    folder, message = _checkpoint(tmp_path / "run" / "checkpoint-2", kind)
    exact = message.endswith(".")
    code, err = _cli(
        "train",
        [
            "--config",
            str(YAML["train"]),
            "--output_dir",
            str(tmp_path / "out"),
            "--resume_from_checkpoint",
            str(folder),
        ],
        capsys,
    )
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", message, exact)
    with pytest.raises(ValueError) as error:
        DiffusionOPDConfig(output_dir=str(tmp_path / "out"), resume_from_checkpoint=str(folder))
    _assert_message(error.value, message, exact)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- needs the model
@pytest.fixture
def tiny_teachers(tmp_path):
    from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora

    pipeline = get_tiny_sd3_pipeline(seed=0)
    return pipeline, {"a": str(save_toy_lora(pipeline, tmp_path / "teacher_a", seed=1, rank=2))}


@pytest.mark.parametrize(
    "text, resolution, got", [("33", 33, "33; e.g. 32"), ("32x50", [32, 50], "32x50; e.g. 32x48")]
)
def test_resolution_off_the_latent_grid(tmp_path, capsys, tiny_teachers, text, resolution, got):
    message = (
        f"`resolution` must be a multiple of 4 for this sd3 pipeline (VAE scale factor 2 x latent patch 2), got {got}."
    )
    output_dir = tmp_path / "out"
    code, err = _cli(
        "train", ["--config", str(YAML["train"]), "--output_dir", str(output_dir), "--resolution", text], capsys
    )
    assert code == 2
    _assert_one_line(err, "trl-diffusion-opd train", message, exact=True)
    assert not output_dir.exists()  # checked before the toy teachers are written

    pipeline, teachers = tiny_teachers
    with pytest.raises(ValueError) as error:
        DiffusionOPDTrainer(
            pipeline,
            teachers=teachers,
            args=DiffusionOPDConfig(output_dir=str(output_dir), resolution=resolution, report_to="none"),
            train_dataset={"a": ["a red circle"]},
        )
    _assert_message(error.value, message, exact=True)
    assert not any(".a." in name for name, _ in pipeline.transformer.named_parameters())  # no teacher was added
    assert not output_dir.exists()
    with pytest.raises(ValueError) as error:  # a toy teacher is written only once the resolution is known to fit
        DiffusionOPDTrainer(
            "tiny:sd3",
            teachers={"a": "toy:1"},
            args=DiffusionOPDConfig(output_dir=str(output_dir), resolution=resolution, report_to="none"),
            train_dataset={"a": ["a red circle"]},
        )
    _assert_message(error.value, message, exact=True)
    assert not output_dir.exists()


def test_resume_true_without_checkpoint_and_corrupt_checkpoint_through_train(tmp_path, tiny_teachers):
    pipeline, teachers = tiny_teachers
    output_dir = tmp_path / "out"
    trainer = DiffusionOPDTrainer(
        pipeline,
        teachers=teachers,
        args=DiffusionOPDConfig(
            output_dir=str(output_dir), resolution=32, num_inference_steps=2, max_steps=1, report_to="none"
        ),
        train_dataset={"a": ["a red circle"]},
    )
    with pytest.raises(ValueError) as error:
        trainer.train(resume_from_checkpoint=True)
    _assert_message(
        error.value,
        f"`resume_from_checkpoint=True` but {output_dir} holds no checkpoint-<step> folder; "
        "`--resume_from_checkpoint auto` starts the run when there is none.",
        True,
    )
    folder, message = _checkpoint(output_dir / "checkpoint-1", "corrupt_weights")
    with pytest.raises(ValueError) as error:
        trainer.train(resume_from_checkpoint=True)  # the last checkpoint of output_dir, incomplete: none is left
    prefix = f"`resume_from_checkpoint=True` but {output_dir} holds no complete checkpoint-<step> folder ("
    _assert_message(error.value, prefix + message, exact=False)
    assert trainer.state.global_step == 0


# ---------------------------------------------------------------------------------------------- reward server
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b"<html>502 Bad Gateway</html>",
            "Reward 'geneval': the server at http://127.0.0.1:1 answered 28 bytes that are not JSON (JSONDecodeError: ",
        ),
        ("old", "Reward 'geneval': the server answered protocol version None; this client speaks 1."),
        ("dict", "Reward 'geneval': the server's 'strict_rewards' is a dict, not a list of scores: "),
        ("words", "Reward 'geneval': the server's 'strict_rewards' holds a value that is not a number ("),
        ("short", "Reward 'geneval': the server returned 1 'strict_rewards' for 2 images."),
    ],
    ids=["not_json", "no_version", "dict", "words", "wrong_length"],
)
def test_malformed_reward_server_answer_is_one_line(body, message, monkeypatch):
    import json

    from PIL import Image

    answers = {
        "old": {"strict_rewards": [1.0, 0.0]},
        "dict": {"version": 1, "strict_rewards": {"a": 1}},
        "words": {"version": 1, "strict_rewards": ["high", "low"]},
        "short": {"version": 1, "strict_rewards": [1.0]},
    }
    payload = json.dumps(answers[body]).encode() if isinstance(body, str) else body
    monkeypatch.setattr(RemoteReward, "_post", lambda self, data, content_type=None: payload)
    from trl_diffusion_opd.rewards import get_reward

    reward = get_reward("geneval", url="http://127.0.0.1:1")
    images = [Image.new("RGB", (8, 8))] * 2
    with pytest.raises(RewardServerError) as error:
        reward.score(images, ["a", "b"], [{}, {}])
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(message), str(error.value)
