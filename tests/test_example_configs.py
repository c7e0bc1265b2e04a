"""Every shipped recipe runs: each `examples/configs/*.yaml`, and each YAML config in `README.md` and `docs/**/*.md`,
end to end through the real command (`trl_diffusion_opd.cli.main`), on tiny models.

A config is run as written except for what a CPU test cannot load or afford, which is swapped for the smallest thing
of the same form:

- the base becomes its family's tiny base (`tiny:sd3`, `tiny:flux2_klein`, ..., `BASES` below; `world:` and `tiny:`
  names stay), and every teacher `toy:<seed>`, in the same layout: a dict spec keeps its other keys (`weight`,
  `guidance_scale`, `name`, ...), an ensemble stays a list, a two-expert base (Wan 2.2 A14B) gets a LoRA file per
  expert; shipped `world:` teachers stay;
- prompt files become small files of the same format at the same relative paths (`.jsonl` rows with GenEval-style
  metadata, `.txt` lines); inline lists and registered training sources stay; a registered held-out source becomes
  its first 2 rows, inline (every evaluation samples the whole eval set);
- rewards that need a model or a server (`ocr`, `geneval`, `aesthetic`, `clipscore`, `temporal_consistency`, ...)
  become the rule-based `brightness` / `saturation` / `jpeg_compressibility` (their `reward_kwargs` dropped), in
  `reward_funcs`, `eval_rewards` and the eval command's columns;
- sizes: the family's tiny resolution and frame count, 2 sampler steps, at most 8 prompt tokens, 1 prompt per task and
  round, 2 generations per prompt; `max_steps: 2` with periodic evaluation (`eval_strategy: steps`, `eval_steps: 1`)
  whenever the config has an eval set, checkpoints every 2 steps when it saves any, output under a temporary folder;
  `use_cpu: true` when it trains in bf16/fp16 (transformers refuses mixed precision on a CPU otherwise); no push to
  the Hub, and no `accelerate launch` options (`accelerate_config`, `num_processes`, ...): one process.

Everything else (LoRA shape and targets, EMA, lr schedule, loss and KL normalisation, guidance scales, task weights,
samplers, trackers, ...) is the config's own. A new YAML is picked up without editing this file; a base of a family not
in `BASES` fails with a message saying so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from trl_diffusion_opd import cli
from trl_diffusion_opd.data import prompts_by_task
from trl_diffusion_opd.registry import load_pipeline
from trl_diffusion_opd.scripts import launch as script_launch
from trl_diffusion_opd.scripts import utils as script_utils
from trl_diffusion_opd.testing import (
    TINY_RESOLUTION,
    TINY_WAN_FRAMES,
    TINY_WAN_I2V_SIZE,
    TINY_WAN_RESOLUTION,
    TINY_WAN_TI2V_RESOLUTION,
    get_tiny_input_image,
)
from trl_diffusion_opd.trainer import DiffusionNFTConfig, FlowGRPOConfig


ROOT = Path(__file__).parents[1]
# Checked in order, on the lower-cased `model_name_or_path`: (substring, tiny base, tiny resolution).
BASES = [
    ("flux.2", "tiny:flux2_klein", TINY_RESOLUTION),
    ("kontext", "tiny:flux_kontext", TINY_RESOLUTION),
    ("flux", "tiny:flux", TINY_RESOLUTION),
    ("qwen-image-edit", "tiny:qwenimage_edit_plus", TINY_RESOLUTION),
    ("qwen-image", "tiny:qwenimage", TINY_RESOLUTION),
    ("z-image", "tiny:zimage", TINY_RESOLUTION),
    ("wan2.2-i2v-a14b", "tiny:wan22_i2v", list(TINY_WAN_I2V_SIZE)),
    ("wan2.1-i2v", "tiny:wan_i2v", list(TINY_WAN_I2V_SIZE)),
    ("wan2.2-ti2v", "tiny:wan22_ti2v", TINY_WAN_TI2V_RESOLUTION),
    ("wan2.2-t2v-a14b", "tiny:wan22", TINY_WAN_RESOLUTION),
    ("wan2.1", "tiny:wan", TINY_WAN_RESOLUTION),
    ("stable-diffusion-3", "tiny:sd3", TINY_RESOLUTION),
]
# Bases whose rows carry an input image (their prompt files get one small frame per row).
IMAGE_BASES = {"tiny:wan_i2v", "tiny:wan22_i2v", "tiny:flux_kontext", "tiny:qwenimage_edit_plus"}
# Family options that size the references, shrunk to the tiny models (Kontext's ~1 MP snap, Qwen-Image-Edit's areas).
TINY_FAMILY_KWARGS = {
    "tiny:flux_kontext": {"auto_resize": False},
    "tiny:qwenimage_edit_plus": {"vae_image_size": 48 * 48, "condition_image_size": 64 * 64},
}
CHEAP_REWARDS = ("brightness", "saturation", "jpeg_compressibility")  # rule-based, no model
PROMPT_FILE = re.compile(r"\.(txt|jsonl)$")
NFT_ONLY = {f.name for f in dataclasses.fields(DiffusionNFTConfig)} - {
    f.name for f in dataclasses.fields(FlowGRPOConfig)
}
COMMAND = re.compile(r"trl-diffusion-opd (train|grpo|nft|eval|merge)\b[^\n]*--config")


# ---------------------------------------------------------------------------------------------- collecting configs
def _command(config: dict, text: str) -> str | None:
    """The command a config is for: the one its own comments run it with, else the one its keys belong to."""
    found = COMMAND.search(text)
    if found:
        return found.group(1)
    if "combination_type" in config:
        return "merge"
    if "adapters" in config:
        return "eval"
    if "teachers" in config:
        return "train"
    if "reward_funcs" in config:
        return "nft" if NFT_ONLY & set(config) else "grpo"
    return None


def _markdown_yaml_blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    blocks = re.findall(r"^```ya?ml[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [(f"{path.relative_to(ROOT)}#{index}", block) for index, block in enumerate(blocks)]


def _cases() -> list:
    sources = [
        (str(path.relative_to(ROOT)), path.read_text()) for path in sorted(ROOT.glob("examples/configs/*.yaml"))
    ]
    for markdown in [ROOT / "README.md", *sorted(ROOT.glob("docs/**/*.md"))]:
        sources += _markdown_yaml_blocks(markdown)
    cases, fragments = [], []
    for name, text in sources:
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError:
            continue  # not YAML of a config (e.g. a sketch with placeholders)
        if not isinstance(config, dict):
            continue
        if "model_name_or_path" not in config:
            fragments.append((name, config))
            continue
        command = _command(config, text)
        if command is not None:
            cases.append(pytest.param(name, command, config, id=name))
    # A `teachers:` fragment (other teacher spec forms for a recipe) runs on the example config with the same tasks,
    # the one sharing most teacher references with it; other fragments (a CI file, a few keys) are no runs.
    for name, fragment in fragments:
        tasks = set(fragment.get("teachers") or {})
        bases = [case for case in cases if case.values[1] == "train" and set(case.values[2]["teachers"]) == tasks]
        references = set(re.findall(r"[\w.-]+/[\w./-]+", json.dumps(fragment.get("teachers"))))
        base = max(
            bases,
            key=lambda case: len(references & set(json.dumps(case.values[2]["teachers"]).split('"'))),
            default=None,
        )
        if tasks and base is not None:
            label = f"{name} on {base.values[0]}"
            cases.append(pytest.param(label, "train", {**base.values[2], **fragment}, id=label))
    return cases


CASES = _cases()


def test_every_shipped_example_config_is_a_case():
    names = {case.values[0] for case in CASES}
    for path in ROOT.glob("examples/configs/*.yaml"):
        assert str(path.relative_to(ROOT)) in names
    # the docs' eval.yaml and their complete train config with a teacher ensemble (weights and names)
    commands = {case.values[0]: case.values[1] for case in CASES}
    assert commands.get("docs/rewards_evaluation.md#0") == "eval"
    assert commands.get("docs/opd_trainer.md#0") == "train"
    assert commands.get("docs/merging.md#0") == "merge"


# ---------------------------------------------------------------------------------------------- shrinking
def _tiny_base(name: str) -> tuple[str, int | None]:
    if name.startswith(("tiny:", "world:")):
        return name, None
    for key, tiny, resolution in BASES:
        if key in name.lower():
            return tiny, resolution
    raise AssertionError(f"No tiny base for '{name}': add its family to BASES in tests/test_example_configs.py.")


class _Toys:
    """`toy:<seed>` specs in the layout of the written ones, one seed per adapter."""

    def __init__(self):
        self.seed = 0

    def __call__(self, spec):
        if isinstance(spec, list):
            return [self(item) for item in spec]
        if isinstance(spec, str) and spec.startswith("world:"):
            return spec  # shipped, offline
        self.seed += 1
        if isinstance(spec, dict):
            kept = {k: v for k, v in spec.items() if k not in ("path", "subfolder", "revision", "weight_name")}
            return {**kept, "path": f"toy:{self.seed}"}
        return f"toy:{self.seed}"


class _Rewards:
    """Names of rewards that need a model or a server, swapped for rule-based ones (the same swap everywhere)."""

    def __init__(self):
        self.swapped: dict[str, str] = {}

    def name(self, reward: str) -> str:
        if reward in CHEAP_REWARDS or reward.startswith("world_"):
            return reward
        if reward not in self.swapped:
            self.swapped[reward] = CHEAP_REWARDS[len(self.swapped) % len(CHEAP_REWARDS)]
        return self.swapped[reward]

    def names(self, rewards) -> list[str] | str:
        if isinstance(rewards, str):
            return ",".join(self.names([r.strip() for r in rewards.split(",") if r.strip()]))
        return list(dict.fromkeys(self.name(r) for r in rewards))  # two swapped to one are one reward


def _write_prompt_file(path: Path, held_out: bool, with_images: bool = False) -> None:
    """A small prompt file of the same format at the config's relative path (`.jsonl` rows with an input `image`,
    a PNG beside the file, when the base needs one)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    words = ["cat", "dog", "clock"] if not held_out else ["bird", "vase"]
    if path.suffix == ".jsonl":
        rows = [
            {
                "prompt": f"a photo of a {w}",
                "tag": "single_object",
                "include": [{"class": w, "count": 1}],
                "exclude": [],
            }
            for w in words
        ]
        if with_images:
            for index, row in enumerate(rows):
                frame = path.parent / "frames" / f"{path.stem}_{index}.png"
                frame.parent.mkdir(exist_ok=True)
                get_tiny_input_image(index, *TINY_WAN_I2V_SIZE).save(frame)
                row["image"] = f"frames/{frame.name}"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text("".join(f'a sign that says "{w}"\n' for w in words))


def _prompts(value, held_out: bool, with_images: bool = False):
    """Prompt files (a source or `{task: source}`) written small; inline lists kept; a held-out registered source
    (`world:letters:heldout`, 96 scenes) becomes its first 2 rows, inline (every eval samples them all)."""
    if isinstance(value, dict):
        return {task: _prompts(source, held_out, with_images) for task, source in value.items()}
    if isinstance(value, str) and PROMPT_FILE.search(value):
        _write_prompt_file(Path(value), held_out, with_images)
    elif isinstance(value, str) and held_out:
        return [dict(row) for row in prompts_by_task({"task": value})["task"][:2]]
    return value


def _has_eval_set(config: dict) -> bool:
    return config.get("eval_prompts") is not None or (
        config.get("dataset_test_split") is not None and config.get("dataset_name") is not None
    )


def shrink_training(config: dict, command: str, out: Path) -> dict:
    """The config as a CPU test runs it (see the module docstring)."""
    config = dict(config)
    config["model_name_or_path"], resolution = _tiny_base(config["model_name_or_path"])
    if resolution is not None:
        config["resolution"] = resolution
    if "num_frames" in config:
        config["num_frames"] = TINY_WAN_FRAMES
    if "teachers" in config:
        toys = _Toys()
        config["teachers"] = {task: toys(spec) for task, spec in config["teachers"].items()}
    if config["model_name_or_path"] in TINY_FAMILY_KWARGS:
        config["family_kwargs"] = {
            **(config.get("family_kwargs") or {}),
            **TINY_FAMILY_KWARGS[config["model_name_or_path"]],
        }
    # a text-to-video base run as `WanImageToVideoPipeline` (TI2V-5B's image-to-video YAML) takes frames too
    images = config["model_name_or_path"] in IMAGE_BASES or config.get("pipeline_class") == "WanImageToVideoPipeline"
    config["prompts"] = _prompts(config.get("prompts"), held_out=False, with_images=images)
    if config.get("eval_prompts") is not None:
        config["eval_prompts"] = _prompts(config["eval_prompts"], held_out=True, with_images=images)
    rewards = _Rewards()
    if "reward_funcs" in config:
        config["reward_funcs"] = rewards.names(config["reward_funcs"])
    if config.get("eval_rewards"):
        value = config["eval_rewards"]
        config["eval_rewards"] = (
            {task: rewards.names(names) for task, names in value.items()}
            if isinstance(value, dict)
            else rewards.names(value)
        )
    if config.get("reward_kwargs"):
        config["reward_kwargs"] = {k: v for k, v in config["reward_kwargs"].items() if k not in rewards.swapped}
    config["num_inference_steps"] = 2
    config["max_sequence_length"] = min(config.get("max_sequence_length") or 8, 8)
    if config["model_name_or_path"] == "tiny:qwenimage_edit_plus":
        config["max_sequence_length"] = 64  # the VL template and the reference's vision tokens come with the prompt
    config["per_device_train_batch_size"] = 1
    if command in ("grpo", "nft"):
        config["num_generations"] = 2
        if config.get("generation_batch_size"):
            config["generation_batch_size"] = 2
    config["max_steps"] = 2
    if _has_eval_set(config):
        config["eval_strategy"] = "steps"
        config["eval_steps"] = 1
    if config.get("save_strategy", "steps") != "no":
        config["save_steps"] = 2
    if config.get("bf16") or config.get("fp16"):
        config["use_cpu"] = True
    config["output_dir"] = str(out)
    config["disable_tqdm"] = True
    config["push_to_hub"] = False  # no Hub here
    # `accelerate launch` options would relaunch the run on several processes (presets: see tests/test_sharded.py)
    for key in [*script_launch.launch_options(), "--accelerate_config"]:
        config.pop(key.removeprefix("--"), None)
    return config


# ---------------------------------------------------------------------------------------------- running
def _run(command: str, config: dict, tmp_path: Path, monkeypatch) -> list:
    """Run `trl-diffusion-opd COMMAND --config` on `config` in `tmp_path` (relative prompt paths resolve there)
    and return the trainers it built."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    trainers = []
    run_training = script_utils.run_training

    def keep(trainer, script_args, training_args):
        trainers.append(trainer)
        return run_training(trainer, script_args, training_args)

    monkeypatch.setattr(script_utils, "run_training", keep)
    assert cli.main([command, "--config", str(path)]) == 0
    return trainers


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_adapter(base: str, out: Path, experts: int) -> None:
    """The exported student loads into a fresh base with diffusers' `load_lora_weights`, every tensor of it."""
    pipe = load_pipeline(base)
    files = {"transformer": out / "pytorch_lora_weights.safetensors"}
    if experts > 1:
        files["transformer_2"] = out / "pytorch_lora_weights_transformer_2.safetensors"
    for component, file in files.items():
        assert file.is_file(), file
        extra = {"load_into_transformer_2": True} if component == "transformer_2" else {}
        pipe.load_lora_weights(str(out), weight_name=file.name, adapter_name="student", **extra)
        module = getattr(pipe, component)
        loaded = [n for n, _ in module.named_parameters() if ".student." in n]
        assert len(loaded) == len(load_file(str(file))) > 0


@pytest.mark.parametrize("name, command, config", CASES)
def test_example_config_runs_end_to_end(name, command, config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    if command == "eval":
        _check_eval_config(config, tmp_path, monkeypatch)
        return
    if command == "merge":
        _check_merge_config(config, tmp_path)
        return
    run = shrink_training(config, command, out)
    (trainer,) = _run(command, run, tmp_path, monkeypatch)

    history = trainer.state.log_history
    assert trainer.state.global_step == 2
    if config.get("pipeline_class"):  # the base as that class (TI2V-5B's Hub repo is a WanPipeline)
        assert type(trainer.pipeline).__name__ == config["pipeline_class"]
    if command == "train":  # the teachers' layout as written: an ensemble's members, every expert covered
        for task, spec in config["teachers"].items():
            members = trainer.teacher_specs[task]
            assert len(members) == (len(spec) if isinstance(spec, list) else 1)
            assert all(len(member.experts) == len(trainer.family.experts) for member in members)
    evals = [entry for entry in history if "eval_runtime" in entry]
    if _has_eval_set(run):
        assert [entry["step"] for entry in evals] == [1, 2]
        tasks = list(trainer.eval_prompts)
        if command == "train":
            expected = ["eval_kl", "eval_loss", *(f"eval_kl/{task}" for task in tasks)]
        else:
            expected = ["eval_reward", *(f"eval_rewards/{r.name}" for r in trainer.reward_funcs)]
        for entry in evals:
            assert all(_finite(entry[key]) for key in expected), (entry, expected)
        if command == "train":
            assert all(entry["eval_kl"] > 0 for entry in evals)  # toy teachers differ from the student
    else:
        assert evals == []
    if run.get("eval_rewards"):
        # `RewardEvalCallback` every eval_steps (1) and at the end
        sampled = [entry for entry in history if any(key.startswith("rewards/") for key in entry)]
        assert {entry["step"] for entry in sampled} >= {1, 2}
    if run.get("save_strategy", "steps") != "no":
        state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
        assert [entry["step"] for entry in state["log_history"] if "eval_runtime" in entry] == [
            e["step"] for e in evals
        ]
    _check_adapter(run["model_name_or_path"], out, len(trainer.family.experts))


# ---------------------------------------------------------------------------------------------- the merge command
def _check_merge_config(config: dict, tmp_path: Path) -> None:
    """A `merge` config: its adapters become toy LoRAs (shipped `world:` ones stay), its base the family's tiny one;
    the merged adapter loads into a fresh base, every tensor of it."""
    config = dict(config)
    config["model_name_or_path"], _ = _tiny_base(config["model_name_or_path"])
    toys = _Toys()
    config["adapters"] = {label: toys(spec) for label, spec in config["adapters"].items()}
    config["output_dir"] = str(tmp_path / "merged")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert cli.main(["merge", "--config", str(path)]) == 0
    _check_adapter(config["model_name_or_path"], tmp_path / "merged", experts=1)


# ---------------------------------------------------------------------------------------------- the eval command
def _check_eval_config(config: dict, tmp_path: Path, monkeypatch) -> None:
    """An `eval` config: its adapters become toy LoRAs, each reward column a rule-based reward (`reward@column`, so
    that the columns stay distinct), sizes tiny; the table is written with a finite score in every cell."""
    config = dict(config)
    config["model_name_or_path"], resolution = _tiny_base(config["model_name_or_path"])
    if resolution is not None:
        config["resolution"] = resolution
    if "num_frames" in config:
        config["num_frames"] = TINY_WAN_FRAMES
    toys = _Toys()
    config["adapters"] = {label: toys(spec) for label, spec in (config.get("adapters") or {}).items()}
    rewards = _Rewards()
    columns = {}
    for column, source in config["prompts"].items():
        reward, _, label = column.partition("@")
        cheap = rewards.name(reward)
        columns[column if cheap == reward else f"{cheap}@{label or reward}"] = _prompts(source, held_out=True)
    config["prompts"] = columns
    for key in ("reward_kwargs", "normalization"):
        if config.get(key):
            config[key] = {k: v for k, v in config[key].items() if k.partition("@")[0] not in rewards.swapped}
    config.update(num_inference_steps=2, max_sequence_length=8, batch_size=2, max_prompts=2, grid_size=2)
    config["output_dir"] = str(tmp_path / "eval")
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert cli.main(["eval", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    text = json.dumps(results)
    assert "NaN" not in text and "Infinity" not in text
    for label in config["adapters"]:
        assert label in text
