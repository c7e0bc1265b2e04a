"""The `trl-diffusion-opd` command: YAML configs, command-line overrides, errors, accelerate relaunch, `env`."""

import json
import logging
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trl_diffusion_opd import DiffusionModelConfig, cli
from trl_diffusion_opd.scripts import LIBRARY_NOISE, quiet_library_logs
from trl_diffusion_opd.scripts import launch as script_launch
from trl_diffusion_opd.scripts import train as train_script
from trl_diffusion_opd.scripts import utils as script_utils
from trl_diffusion_opd.scripts.train import DiffusionOPDScriptArguments
from trl_diffusion_opd.sizes import image_size
from trl_diffusion_opd.trainer.model_config import get_student_lora_config


ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"
RECIPE = ROOT / "examples" / "configs" / "sd35m_three_teachers.yaml"
# Text of the import-time notes other libraries print (bitsandbytes' optional Hub kernel on a CPU with AVX512-BF16,
# transformers' image-processor fallback without torchvision), which the programs drop.
NOISE = ("gemm_4bit_forward", "kernels-community", "requires torchvision")
PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")  # a tqdm line: "100%|####| 1/1 [00:01<00:00, ...]"


def _not_progress(stderr: str) -> list[str]:
    """The non-blank lines of `stderr` that are not progress-bar updates."""
    return [line for line in re.split(r"[\r\n]+", stderr) if line.strip() and not PROGRESS_BAR.search(line)]


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "trl-diffusion-opd"
    assert script.is_file(), "the package must be installed (make install) so that the console script exists"
    return [str(script)]


def _run(args: list[str], tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    env.pop(script_launch.LAUNCHED_ENV, None)
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
    # No other library's notes: stderr holds the progress bar only.
    assert not [noise for noise in NOISE if noise in result.stderr]
    assert _not_progress(result.stderr) == []
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
    # The end of training says where the adapter and its card are and how to load them.
    assert (
        f"Saved the student adapter to {output_dir / 'pytorch_lora_weights.safetensors'} and its model card to "
        in (result.stdout)
    )
    assert f'    pipe = get_tiny_sd3_pipeline(seed=0)\n    pipe.load_lora_weights("{output_dir}")' in result.stdout


def test_unknown_yaml_key_is_one_line_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.read_text() + "\nnot_a_field: 3\nlearning_rat: 0.1\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == (
        f"trl-diffusion-opd train: error: unknown key(s) in {config}: not_a_field, learning_rat "
        "(did you mean learning_rate?).\n"
    )


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
    monkeypatch.setenv(script_launch.LAUNCHED_ENV, "")  # not yet launched; restored after the test
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
    assert os.environ[script_launch.LAUNCHED_ENV] == "1"


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


def test_num_processes_alone_launches_that_many_processes(captured_launch, capsys):
    """`--num_processes 2` alone would run one process in accelerate (no GPUs, no config file): `--multi_gpu` is
    added, which starts 2 processes (gloo on a CPU)."""
    assert cli.main(["train", "--config", str(TINY), "--num_processes", "2"]) == 0
    (namespace,) = captured_launch
    assert namespace.multi_gpu is True and namespace.num_processes == 2 and namespace.config_file is None
    assert script_launch.complete_launch_args(["--num_processes", "1"]) == ["--num_processes", "1"]
    preset = ["--accelerate_config", "fsdp2", "--num_processes", "2"]
    assert "--multi_gpu" not in script_launch.complete_launch_args(script_launch.resolve_accelerate_config(preset))
    assert cli.main(["train", "--config", str(TINY), "--num_processes", "2", "--cpu"]) == 2
    assert "`--cpu` with `--num_processes 2` runs one process in accelerate" in capsys.readouterr().err
    assert len(captured_launch) == 1


def test_saved_message_names_the_files_and_the_loading_lines(tmp_path):
    message = script_utils.saved_message(tmp_path, "org/base")
    assert message.splitlines() == [
        f"Saved the student adapter to {tmp_path.resolve() / 'pytorch_lora_weights.safetensors'} and its model card "
        f"to {tmp_path.resolve() / 'README.md'}. Load it with:",
        "    from diffusers import DiffusionPipeline",
        '    pipe = DiffusionPipeline.from_pretrained("org/base")',
        f'    pipe.load_lora_weights("{tmp_path.resolve()}")',
    ]


def test_unknown_accelerate_preset(captured_launch, capsys):
    assert cli.main(["train", "--config", str(TINY), "--accelerate_config", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a file nor a preset" in err and "multi_gpu" in err
    assert captured_launch == []


def test_env_lists_versions(tmp_path):
    result = _run(["env"], tmp_path, timeout=600)
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
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "env" in out and "--help --all" in out
    assert cli.main(["--help", "--all"]) == 0
    assert "\n  world   The tiny text-to-image world" in capsys.readouterr().out  # a plug-in's command
    assert cli.main([]) == 2  # a bare command is a usage error, as in argparse
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "trl-diffusion-opd: error: a command is required (choose from train, grpo, nft, eval, merge, env; "
        "`trl-diffusion-opd --help` lists them)"
    )
    assert cli.main(["frobnicate"]) == 2  # close to no command ("serve" is close to "merge")
    assert (
        capsys.readouterr().err
        == "trl-diffusion-opd: error: unknown command 'frobnicate' (choose from train, grpo, nft, eval, merge, env, world)\n"
    )
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.endswith("; did you mean 'train'?\n")


def test_env_help(capsys):
    assert cli.main(["env", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: trl-diffusion-opd env\n")


def test_import_help_and_version_import_no_torch_and_print_nothing_on_stderr(tmp_path):
    """`import trl_diffusion_opd`, `--help`, `--version` and `env --help` load no torch, diffusers or transformers
    (the public names load on first use) and print no library noise."""
    code = (
        "import sys, trl_diffusion_opd\n"
        "from trl_diffusion_opd import cli\n"
        "assert cli.main(['--help']) == cli.main(['--version']) == cli.main(['env', '--help']) == 0\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert result.stderr == ""
    console = subprocess.run(_console_script() + ["--version"], capture_output=True, text=True, env=env, timeout=600)
    assert console.stdout == f"trl-diffusion-opd {version('trl-diffusion-opd')}\n" and console.stderr == ""

    import trl_diffusion_opd
    from trl_diffusion_opd import DiffusionOPDTrainer
    from trl_diffusion_opd.trainer import opd_trainer

    assert DiffusionOPDTrainer is opd_trainer.DiffusionOPDTrainer
    assert all(getattr(trl_diffusion_opd, name) is not None for name in trl_diffusion_opd.__all__)
    assert set(trl_diffusion_opd.__all__) <= set(dir(trl_diffusion_opd))
    with pytest.raises(AttributeError, match="has no attribute 'NotAName'"):
        trl_diffusion_opd.NotAName  # noqa: B018


def test_command_help_imports_only_the_configurations_and_prints_nothing_on_stderr():
    """`eval --help` loads no torch, transformers or diffusers (its arguments are a plain dataclass); `train`, `grpo`
    and `nft --help` load their configurations, which subclass transformers' `TrainingArguments` (hence torch), but no
    diffusers, datasets, trainer, data, teacher or reward module. Other libraries' import-time notes are dropped."""
    code = """
import contextlib, io, json, sys
from trl_diffusion_opd import cli
HEAVY = ["torch", "transformers", "diffusers", "datasets"] + [f"trl_diffusion_opd.{name}" for name in (
    "trainer.base_trainer", "trainer.opd_trainer", "trainer.grpo_trainer", "trainer.nft_trainer", "families.base",
    "data", "teachers", "rewards", "evaluation")]
loaded = {}
for command in ("eval", "train", "grpo", "nft"):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        cli.main([command, "--help"])
    assert out.getvalue().startswith(f"usage: trl-diffusion-opd {command} "), out.getvalue()[:200]
    loaded[command] = [name for name in HEAVY if name in sys.modules]
print(json.dumps(loaded))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded == {"eval": [], "train": ["torch", "transformers"], "grpo": ["torch", "transformers"],
                      "nft": ["torch", "transformers"]}  # fmt: skip
    assert result.stderr == ""


def test_trainer_package_names_load_on_first_use():
    from trl_diffusion_opd import trainer
    from trl_diffusion_opd.trainer import opd_config

    assert sorted(trainer._LAZY) == trainer.__all__
    assert all(getattr(trainer, name).__name__ == name for name in trainer.__all__)
    assert trainer.DiffusionOPDConfig is opd_config.DiffusionOPDConfig
    with pytest.raises(AttributeError, match="has no attribute 'NotAName'"):
        trainer.NotAName  # noqa: B018


def test_abbreviated_options_are_refused_with_a_suggestion(capsys):
    """As in TRL's CLI, a prefix of an option is an unknown option (argparse would take `--learning_rat` for
    `--learning_rate`), and the error names the option it resembles."""
    assert cli.main(["train", "--config", str(TINY), "--learning_rat", "1e-3"]) == 2
    assert capsys.readouterr().err == (
        "trl-diffusion-opd train: error: unrecognized arguments: --learning_rat (did you mean --learning_rate?).\n"
    )
    assert cli.main(["grpo", "--config", str(ROOT / "examples/configs/tiny_grpo.yaml"), "--num_generation", "2"]) == 2
    assert capsys.readouterr().err.endswith("--num_generation (did you mean --num_generations?).\n")
    prompts = '{"brightness": ["a"]}'
    assert cli.main(["eval", "--model_name_or_path", "tiny:sd3", "--prompts", prompts, "--batch_siz", "2"]) == 2
    assert capsys.readouterr().err == (
        "trl-diffusion-opd eval: error: unrecognized arguments: --batch_siz 2 (did you mean --batch_size?).\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["world", "eval", "--num_image", "2"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --num_image 2" in capsys.readouterr().err


def test_quiet_library_logs_drops_only_the_known_notes():
    quiet_library_logs()
    quiet_library_logs()  # a second call adds nothing
    for name, text in LIBRARY_NOISE:
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record, seen=seen: seen.append(record.getMessage())
        logger.addHandler(handler)
        try:
            logger.warning("note: %s (details)", text)
            logger.warning("an unrelated warning")
        finally:
            logger.removeHandler(handler)
        assert seen == ["an unrelated warning"]


def test_bare_train_points_at_config_and_unknown_flag_gets_a_suggestion(capsys):
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("trl-diffusion-opd train: error: `teachers` is required. Give a configuration: ")
    assert "`trl-diffusion-opd train --config FILE.yaml` (try examples/configs/tiny.yaml" in err
    assert cli.main(["nft"]) == 2
    assert "examples/configs/tiny_nft.yaml" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(TINY), "--learning_rte", "1e-4"]) == 2
    assert capsys.readouterr().err == (
        "trl-diffusion-opd train: error: unrecognized arguments: --learning_rte (did you mean --learning_rate?).\n"
    )


def test_train_help_lists_the_package_options_first_in_groups():
    text = train_script.make_parser().format_help()
    titles = ["model:", "teachers:", "prompts:", "rollout:", "loss:", "optimisation:", "evaluation:", "output:"]
    titles += ["launch:", "transformers' TrainingArguments:"]
    positions = [text.index(f"\n{title}\n") for title in titles]
    assert positions == sorted(positions)
    assert "more options of trl-diffusion-opd" not in text  # every own option is in a named group
    # Every option of the package comes before transformers' own ones.
    transformers_part = text[positions[-1] :]
    for flag in ("--teachers", "--prompts", "--lora_r", "--kl_normalization", "--offload_text_encoders", "--ema"):
        assert flag + " " in text[: positions[-1]] and flag + " " not in transformers_part
    assert "--adam_beta1" in transformers_part and "--max_steps" not in transformers_part
    assert text.startswith("usage: trl-diffusion-opd train [--config FILE.yaml] [OPTIONS] [--accelerate_config")
    flat = " ".join(text.split())
    assert "`toy:<seed>`" in flat and "owner/repo[/sub/folder][@revision]" in flat  # the teacher spec forms
    assert "is a round: a rollout on every task's prompts and one optimizer step" in flat
    assert "`--num_processes N` alone starts N data-parallel processes" in flat and "multi_gpu" in flat
    assert "`output_dir` is relative to the working directory" in flat


def test_yaml_relative_paths_resolve_from_the_yaml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    (folder / "teachers" / "shapes").mkdir(parents=True)
    (folder / "prompts.txt").write_text("a red circle\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd_prompts.txt").write_text("a blue square\n")
    config = folder / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "tiny:sd3",
                "teachers": {"shapes": "teachers/shapes", "text": [{"path": "toy:1"}, "org/repo"]},
                "prompts": {"shapes": "prompts.txt", "text": "cwd_prompts.txt", "inline": ["prompts.txt"]},
                "output_dir": "out",
            }
        )
    )
    script_args, training_args, _ = train_script.make_parser().parse_args_and_config(["--config", str(config)])
    assert script_args.teachers == {"shapes": str(folder / "teachers/shapes"), "text": [{"path": "toy:1"}, "org/repo"]}
    # Next to the YAML file first; a path found only from the working directory and inline prompts stay as written.
    assert script_args.prompts == {
        "shapes": str(folder / "prompts.txt"),
        "text": "cwd_prompts.txt",
        "inline": ["prompts.txt"],
    }
    assert training_args.output_dir == "out"  # relative to the working directory, as in transformers
    # The command line is not a file: its relative paths stay relative to the working directory.
    script_args, _, _ = train_script.make_parser().parse_args_and_config(
        ["--config", str(config), "--prompts", '{"shapes": "prompts.txt"}']
    )
    assert script_args.prompts == {"shapes": "prompts.txt"}


def test_unsupported_prompt_file_extension_is_named(tmp_path):
    from trl_diffusion_opd.data import load_prompt_source

    (tmp_path / "prompts.text").write_text("a cat\n")
    accepted = "accepted: .txt, .jsonl, .csv, .json, .parquet (or a dataset folder, a Hub dataset id"
    with pytest.raises(ValueError, match=r"prompt file '.*prompts.text' has an unsupported extension '.text'; ") as e:
        load_prompt_source(str(tmp_path / "prompts.text"))
    assert accepted in str(e.value)
    with pytest.raises(
        ValueError, match=r"'prompts.text' has an unsupported extension '.text' \(and does not exist\)"
    ):
        load_prompt_source("prompts.text")


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
    assert training_args.resolution == (480, 832)  # Wan's native 480p, height x width
    assert all(side % multiple == 0 for side in image_size(training_args.resolution))
    assert (training_args.num_frames - 1) % 4 == 0
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
