"""The `trl-diffusion-opd` command: YAML configs, command-line overrides, errors, accelerate relaunch, `env`."""

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trl_diffusion_opd import DiffusionModelConfig, cli
from trl_diffusion_opd.scripts import train as train_script
from trl_diffusion_opd.scripts import utils as script_utils
from trl_diffusion_opd.scripts.train import DiffusionOPDScriptArguments
from trl_diffusion_opd.trainer.model_config import get_student_lora_config


ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"
RECIPE = ROOT / "examples" / "configs" / "sd35m_three_teachers.yaml"


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "trl-diffusion-opd"
    assert script.is_file(), "the package must be installed (make install) so that the console script exists"
    return [str(script)]


def _run(args: list[str], tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    env.pop(script_utils.LAUNCHED_ENV, None)
    return subprocess.run(_console_script() + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_tiny_yaml_with_overrides_writes_loadable_adapter(tmp_path):
    output_dir = tmp_path / "run"
    result = _run(
        [
            "train",
            "--config",
            str(TINY),
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "2",
            "--learning_rate",
            "0.002",
            "--teacher_guidance_scale",
            '{"shapes": 2.0, "text": 3.0}',
            "--task_weights",
            '{"text": 0.5}',
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    args = json.loads((output_dir / "training_args.json").read_text())  # JSON, no pickle
    assert args["max_steps"] == 2 and args["learning_rate"] == 0.002  # command line over YAML (60, 5e-3)
    assert args["teacher_guidance_scale"] == {"shapes": 2.0, "text": 3.0}  # JSON dict on the command line
    assert args["task_weights"] == {"text": 0.5}
    assert args["num_inference_steps"] == 4 and args["resolution"] == 32  # from the YAML
    card = (output_dir / "README.md").read_text()
    assert "| rounds (optimizer steps) | 2 |" in card
    assert "| shapes | `" in card and "| 2.0 | 1.0 |" in card and "| 3.0 | 1.0 |" in card

    # The adapter loads in plain diffusers on the same tiny base and changes its predictions.
    from trl_diffusion_opd.testing import get_tiny_sd3_pipeline

    pipe = get_tiny_sd3_pipeline(seed=0)
    inputs = {
        "hidden_states": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
        "encoder_hidden_states": torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1)),
        "pooled_projections": torch.randn(1, 64, generator=torch.Generator().manual_seed(2)),
        "timestep": torch.tensor([500.0]),
    }
    with torch.no_grad():
        base = pipe.transformer(**inputs).sample
        pipe.load_lora_weights(str(output_dir), adapter_name="opd")
        adapted = pipe.transformer(**inputs).sample
    lora_layers = [name for name, _ in pipe.transformer.named_modules() if name.endswith("lora_A.opd")]
    saved = load_file(output_dir / "pytorch_lora_weights.safetensors")
    # 2 blocks x 8 SD3 attention projections, less `to_add_out` of the last (context-pre-only) block
    assert len(lora_layers) == len([k for k in saved if "lora_A" in k]) == 15
    assert not torch.allclose(base, adapted)


def test_unknown_yaml_key_is_one_line_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.read_text() + "\nnot_a_field: 3\nlearning_rat: 0.1\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == f"trl-diffusion-opd train: error: unknown key(s) in {config}: not_a_field, learning_rat.\n"


def test_unknown_yaml_key_in_the_console_script(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.read_text() + "\nnot_a_field: 3\n")
    result = _run(["train", "--config", str(config)], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"trl-diffusion-opd train: error: unknown key(s) in {config}: not_a_field."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model_name_or_path: [unclosed\n", "is not valid YAML: while parsing a flow sequence"),
        ("- a list\n- not a mapping\n", "must contain a YAML mapping"),
        ({"kl_normalization": "bogus"}, "`kl_normalization` must be one of"),
        ({"teachers": ["a", "b"]}, "`teachers` must be a mapping, got list"),
    ],
)
def test_bad_yaml_is_one_line_error(tmp_path, capsys, text, expected):
    config = tmp_path / "bad.yaml"
    if isinstance(text, dict):  # the tiny config with some values replaced
        text = yaml.safe_dump({**yaml.safe_load(TINY.read_text()), **text})
    config.write_text(text)
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trl-diffusion-opd train: error: ")
    assert expected in err


def test_unknown_flag_and_missing_config_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["train", "--config", str(TINY), "--not_a_flag", "1"]) == 2
    assert capsys.readouterr().err == "trl-diffusion-opd train: error: unrecognized arguments: --not_a_flag.\n"
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(TINY), "--max_steps", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --max_steps/--max-steps: invalid int value: 'many'" in err


def test_yaml_and_command_line_parse_into_the_three_groups(tmp_path):
    parser = train_script.make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config(
        [
            "--config",
            str(TINY),
            "--output_dir",
            str(tmp_path),
            "--teachers",
            '{"shapes": {"path": "toy:3", "guidance_scale": 2.0}, "text": "toy:4"}',
            "--lora_r",
            "4",
            "--lora_target_modules",
            "attn.to_q",
            "attn.to_k",
        ]
    )
    assert script_args.teachers == {"shapes": {"path": "toy:3", "guidance_scale": 2.0}, "text": "toy:4"}
    assert script_args.prompts["shapes"][0] == "a red circle"  # YAML mapping of inline lists
    assert training_args.teacher_guidance_scale is None
    assert training_args.max_steps == 60 and training_args.learning_rate == 0.005
    assert (model_args.model_name_or_path, model_args.lora_r, model_args.lora_alpha) == ("tiny:sd3", 4, 8)
    assert model_args.lora_target_modules == ["attn.to_q", "attn.to_k"]
    assert get_student_lora_config(model_args, _tiny_pipe()).target_modules == {"attn.to_q", "attn.to_k"}


def _tiny_pipe():
    from trl_diffusion_opd.testing import get_tiny_sd3_pipeline

    return get_tiny_sd3_pipeline(with_t5=False)


def test_toy_teachers_and_default_lora_targets(tmp_path):
    pipe = _tiny_pipe()
    teachers = script_utils.materialize_toy_adapters(
        {"a": "toy:1", "b": [{"path": "toy:2", "weight": 2.0}, "org/repo/sub"]}, pipe, tmp_path, rank=2
    )
    assert teachers == {
        "a": str(tmp_path / "a"),
        "b": [{"path": str(tmp_path / "b_0"), "weight": 2.0}, "org/repo/sub"],
    }
    assert (tmp_path / "a" / "pytorch_lora_weights.safetensors").is_file()
    model_args = DiffusionModelConfig(model_name_or_path="tiny:sd3")
    config = get_student_lora_config(model_args, pipe)
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (32, 64, "gaussian")
    assert "attn.add_q_proj" in config.target_modules and "attn.to_out.0" in config.target_modules
    with pytest.raises(ValueError, match="toy:<integer seed>"):
        script_utils.materialize_toy_adapters({"a": "toy:x"}, pipe, tmp_path)


def test_dataset_name_with_task_column_and_test_split(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "two cats", "task": "geneval", "include": [{"class": "cat", "count": 2}]}\n'
        '{"prompt": "a sign", "task": "ocr"}\n'
    )
    script_args = DiffusionOPDScriptArguments(teachers='{"geneval": "a/b", "ocr": "c/d"}', dataset_name=str(path))
    train, evaluation = script_utils.load_prompts(script_args)
    from trl_diffusion_opd.data import prompts_by_task

    assert prompts_by_task(train)["geneval"][0]["include"] == [{"class": "cat", "count": 2}]
    assert evaluation is None
    with pytest.raises(ValueError, match="Give the prompts"):
        DiffusionOPDScriptArguments(teachers={"a": "b/c"})
    with pytest.raises(ValueError, match="`teachers` is required"):
        DiffusionOPDScriptArguments(prompts={"a": ["x"]})


@pytest.fixture
def captured_launch(monkeypatch):
    from accelerate.commands import launch

    calls = []
    monkeypatch.setattr(launch, "launch_command", calls.append)
    monkeypatch.setenv(script_utils.LAUNCHED_ENV, "")  # not yet launched; restored after the test
    return calls


def test_accelerate_config_preset_relaunches_through_accelerate(captured_launch, tmp_path):
    argv = ["train", "--config", str(TINY), "--accelerate_config", "multi_gpu", "--num_processes", "2"]
    argv += ["--max_steps", "3"]
    assert cli.main(argv) == 0
    (namespace,) = captured_launch
    assert Path(namespace.config_file).name == "multi_gpu.yaml" and Path(namespace.config_file).is_file()
    assert namespace.num_processes == 2
    assert namespace.module is True and namespace.training_script == "trl_diffusion_opd.scripts.train"
    # The relaunched job gets the training arguments only, and knows it was launched.
    assert namespace.training_script_args == ["--config", str(TINY), "--max_steps", "3"]
    assert os.environ[script_utils.LAUNCHED_ENV] == "1"


def test_accelerate_options_in_yaml_and_config_file(captured_launch, tmp_path):
    accelerate_file = tmp_path / "accelerate.yaml"
    accelerate_file.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    config = tmp_path / "run.yaml"
    config.write_text(TINY.read_text() + f"\naccelerate_config: {accelerate_file}\nmixed_precision: bf16\n")
    assert cli.main(["train", "--config", str(config)]) == 0
    (namespace,) = captured_launch
    assert namespace.config_file == str(accelerate_file)
    assert namespace.mixed_precision == "bf16"
    assert namespace.training_script_args == ["--config", str(config)]


def test_unknown_accelerate_preset(captured_launch, capsys):
    assert cli.main(["train", "--config", str(TINY), "--accelerate_config", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a file nor a preset" in err and "multi_gpu" in err
    assert captured_launch == []


def test_env_lists_versions(tmp_path):
    result = _run(["env"], tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = dict(line[2:].split(": ", 1) for line in result.stdout.splitlines() if line.startswith("- "))
    assert list(lines)[:4] == ["platform", "python", "torch", "accelerator"]
    assert lines["torch"] == torch.__version__
    assert lines["accelerator"] == ("none (CPU only)" if not torch.cuda.is_available() else lines["accelerator"])
    for package in (
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "trl",
        "datasets",
        "bitsandbytes",
        "huggingface_hub",
        "trl-diffusion-opd",
    ):
        assert lines[package] == version(package)


def test_help_and_unknown_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "env" in out
    assert cli.main(["serve"]) == 2
    assert (
        capsys.readouterr().err
        == "trl-diffusion-opd: error: unknown command 'serve' (choose from train, grpo, nft, eval, env, world)\n"
    )


def test_recipe_config_parses_to_the_paper_settings(tmp_path):
    script_args, training_args, model_args = train_script.make_parser().parse_args_and_config(
        ["--config", str(RECIPE), "--output_dir", str(tmp_path)]
    )
    assert model_args.model_name_or_path == "stabilityai/stable-diffusion-3.5-medium"
    assert script_args.teachers == {
        "geneval": "quanhaol/DiffusionOPD/GenEvalTeacher/lora",
        "ocr": "quanhaol/DiffusionOPD/OCRTeacher/lora",
        "aes": "quanhaol/DiffusionOPD/AesTeacher/lora",
    }
    assert training_args.teacher_guidance_scale == {"geneval": 1.0, "ocr": 4.5, "aes": 4.5}
    assert (training_args.num_inference_steps, training_args.noise_level, training_args.guidance_scale) == (10, 0, 4.5)
    assert (model_args.lora_r, model_args.lora_alpha, training_args.learning_rate) == (32, 64, 3e-4)
    assert (training_args.resolution, training_args.per_device_train_batch_size) == (512, 3)
    assert (training_args.ema, training_args.ema_decay, training_args.ema_update_interval) == (True, 0.9, 8)
    assert json.dumps(script_args.prompts)  # one source per task


def test_unknown_hub_teacher_is_one_line_error_naming_it_offline(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    teachers = '{"shapes": "org/missing/OCRTeacher/lora", "text": "toy:2"}'
    argv = ["train", "--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--teachers", teachers]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "trl-diffusion-opd train: error: Teacher 'shapes': could not resolve 'org/missing/OCRTeacher/lora' from the "
        "Hub (HF_HUB_OFFLINE=1: offline, local cache only)"
    )


def test_train_with_hub_teachers_from_offline_cache(tmp_path):
    """`HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` in a real process: teachers given as `org/repo` (diffusers format) and
    `org/repo/sub/folder` (PEFT format) resolve from the cache."""
    from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_to_hub_cache, save_toy_lora

    pipe = get_tiny_sd3_pipeline(seed=0)  # the base of `tiny:sd3`
    save_toy_lora(pipe, tmp_path / "shapes", seed=1, std=0.3)
    save_toy_lora(pipe, tmp_path / "multi" / "OCRTeacher" / "lora", seed=2, std=0.3, format="peft")
    save_to_hub_cache(tmp_path / "shapes", "org/shapes-teacher", tmp_path / "hub-cache")
    commit = save_to_hub_cache(tmp_path / "multi", "org/DiffusionOPD", tmp_path / "hub-cache").name
    output_dir = tmp_path / "run"
    teachers = json.dumps({"shapes": "org/shapes-teacher", "text": "org/DiffusionOPD/OCRTeacher/lora"})
    result = _run(
        ["train", "--config", str(TINY), "--output_dir", str(output_dir), "--max_steps", "1", "--teachers", teachers],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = (output_dir / "README.md").read_text()
    assert f"| text | `org/DiffusionOPD/OCRTeacher/lora@{commit}` | 4.5 | 1.0 |" in card
    assert "| shapes | `org/shapes-teacher@" in card
    assert not (output_dir / "_toy_teachers").exists()


def test_world_command_is_wired(capsys):
    from trl_diffusion_opd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["world", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "eval" in out


def test_world_config_trains_on_the_shipped_base_and_teachers(tmp_path):
    from trl_diffusion_opd.teachers import parse_teachers
    from trl_diffusion_opd.world.demo import shipped_teachers

    specs = parse_teachers({"a": "world:letters", "b": [{"path": "world:aesthetic", "weight": 2.0}, "x/y"]})
    assert (specs["a"][0].path, specs["a"][0].display) == (shipped_teachers()["letters"], "world:letters")
    assert (specs["b"][0].path, specs["b"][0].display, specs["b"][0].weight) == (
        shipped_teachers()["aesthetic"],
        "world:aesthetic",
        2.0,
    )
    assert specs["b"][1].path == "x/y"
    with pytest.raises(ValueError, match="Teacher 'a': unknown world teacher 'world:ocr'"):
        parse_teachers({"a": "world:ocr"})

    output_dir = tmp_path / "world"
    config = ROOT / "examples" / "configs" / "world.yaml"
    assert cli.main(["train", "--config", str(config), "--max_steps", "1", "--output_dir", str(output_dir)]) == 0
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    card = (output_dir / "README.md").read_text()
    assert "`world:base`" in card and "`world:letters`" in card
    assert "steps supervised for composition" in card and "the first 5 of 10" in card  # task_timestep_fraction 0.5


# (YAML, Hub id, resolution multiple (VAE x 2x2 patch), guidance_scale, guidance_scale_2)
WAN_CONFIGS = [
    ("wan21_t2v_1.3b.yaml", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 16, 5.0, None),
    ("wan21_t2v_14b.yaml", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 16, 5.0, None),
    ("wan22_ti2v_5b.yaml", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", 32, 5.0, None),
    ("wan22_t2v_a14b.yaml", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", 16, 4.0, 3.0),
]


@pytest.mark.parametrize("name, model_id, multiple, guidance, guidance_2", WAN_CONFIGS)
def test_wan_example_configs_parse_to_their_recipe(tmp_path, name, model_id, multiple, guidance, guidance_2):
    """Every Wan example parses through the `train` command's parser with nothing left over, has a resolution and a
    frame count the pipeline accepts, both guidance scales on Wan 2.2 A14B only, and a row in the docs' memory
    table that names it."""
    path = ROOT / "examples" / "configs" / name
    script_args, training_args, model_args, config_rest, cli_rest = train_script.make_parser().parse_args_and_config(
        ["--config", str(path), "--output_dir", str(tmp_path)],
        return_remaining_strings=True,
        separate_remaining_strings=True,
    )
    assert config_rest == [] and cli_rest == []
    assert model_args.model_name_or_path == model_id and training_args.torch_dtype == "bfloat16"
    assert training_args.resolution % multiple == 0 and (training_args.num_frames - 1) % 4 == 0
    assert (training_args.guidance_scale, training_args.guidance_scale_2) == (guidance, guidance_2)
    teacher_2 = dict.fromkeys(script_args.teachers, guidance_2) if guidance_2 is not None else None
    assert training_args.teacher_guidance_scale_2 == teacher_2
    assert training_args.gradient_checkpointing and training_args.kl_normalization == "reference"
    assert training_args.max_sequence_length == 512  # the pipeline's padding, which its cross-attention sees
    assert set(script_args.prompts) == set(script_args.teachers) == set(training_args.eval_rewards)
    table = [line for line in (ROOT / "docs" / "families.md").read_text().splitlines() if line.startswith("|")]
    row = next(line for line in table if f"`{name}`" in line)
    assert row.startswith("| Wan") and "GiB" in row
    assert "Memory path:" in path.read_text()
