"""Periodic evaluation (`eval_strategy`) of the DiffusionOPD and Stage-1 trainers: the eval prompts are the eval set,
the metrics are logged at the right steps with the values `evaluate()` computes, and the best-model options work."""

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from trl_diffusion_opd import (
    DiffusionNFTConfig,
    DiffusionNFTTrainer,
    DiffusionOPDConfig,
    DiffusionOPDTrainer,
    FlowGRPOConfig,
    FlowGRPOTrainer,
)
from trl_diffusion_opd.cli import main as cli_main
from trl_diffusion_opd.rewards import get_reward
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora


TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
TRAIN = {"a": ["red circle", "blue square", "green star", "pink moon"], "b": ["sign open", "word cat"]}
HELD_OUT = {"a": ["black square", "white dot", "grey ring"], "b": ["sign shut"]}
COMMON = {
    "max_steps": 2,
    "resolution": 32,
    "num_inference_steps": 3,
    "per_device_train_batch_size": 2,
    "max_sequence_length": 1,
    "lr_scheduler_type": "constant",
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
    "logging_steps": 1,
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    return {task: str(save_toy_lora(pipe, folder / task, seed=seed, rank=2)) for task, seed in (("a", 1), ("b", 2))}


def _opd(tmp_path, teachers, eval_dataset=HELD_OUT, **kwargs):
    args = DiffusionOPDConfig(output_dir=str(tmp_path / "out"), **{**COMMON, "learning_rate": 1e-2, **kwargs})
    return DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        teachers,
        args=args,
        train_dataset=TRAIN,
        eval_dataset=eval_dataset,
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS),
    )


def _rl(trainer_class, config_class, tmp_path, eval_dataset, **kwargs):
    defaults = {**COMMON, "learning_rate": 1e-2, "num_generations": 2, "guidance_scale": 1.0, "ema": False}
    args = config_class(output_dir=str(tmp_path / "out"), **{**defaults, **kwargs})
    return trainer_class(
        get_tiny_sd3_pipeline(with_t5=False),
        ["brightness", "saturation"],
        args=args,
        train_dataset=["red circle", "blue square"],
        eval_dataset=eval_dataset,
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS),
    )


def _evals(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "eval_runtime" in entry]


def test_opd_evaluates_every_eval_steps_on_the_eval_prompts(tmp_path, teachers):
    """`eval_strategy="steps"` runs `evaluate()` at steps 1 and 2 on the held-out prompts: the logged KL per task is
    the KL that `compute_teacher_kl` measures on the same prompts with the final (EMA) student, and `eval_loss` is
    the training objective, the task-weighted sum of the task losses."""
    trainer = _opd(
        tmp_path, teachers, eval_strategy="steps", eval_steps=1, ema=True, ema_update_interval=1, task_weights={"b": 2}
    )
    assert trainer.eval_dataset == trainer.eval_prompts
    trainer.train()
    evals = _evals(trainer)
    assert [entry["step"] for entry in evals] == [1, 2]
    assert all(math.isfinite(value) and value > 0 for entry in evals for value in entry.values())
    assert evals[0]["eval_kl/a"] != evals[1]["eval_kl/a"]  # the student moved between the two evaluations
    last = evals[-1]
    kl = trainer.compute_teacher_kl(HELD_OUT)  # the eval set, given explicitly
    assert last["eval_kl/a"] == pytest.approx(kl["a"], rel=1e-5)
    assert last["eval_kl/b"] == pytest.approx(kl["b"], rel=1e-5)
    assert last["eval_kl"] == pytest.approx((kl["a"] + kl["b"]) / 2, rel=1e-5)
    # ODE rollouts, reference normalisation: a task's loss is its weight times its KL
    assert last["eval_loss"] == pytest.approx(kl["a"] + 2 * kl["b"], rel=1e-5)


def test_opd_eval_batches_do_not_change_the_ode_kl(tmp_path, teachers):
    """The eval set is sampled in batches of `per_device_eval_batch_size` from one generator per task, so with the
    ODE sampler the KL is the same for batches of 1 and of the whole set."""
    trainer = _opd(tmp_path, teachers, per_device_eval_batch_size=8)
    whole = trainer.compute_teacher_kl()
    trainer.args.per_device_eval_batch_size = 1
    assert trainer.compute_teacher_kl() == pytest.approx(whole, rel=1e-5)


def test_opd_eval_strategy_epoch_is_a_pass_over_the_largest_task(tmp_path, teachers):
    """An epoch is one pass over the largest task's prompts (4 prompts, 2 per round: 2 rounds), so 5 rounds evaluate
    at the ends of epochs 1 and 2 and at the end of training, which closes the third epoch."""
    trainer = _opd(tmp_path, teachers, eval_strategy="epoch", max_steps=5, ema=False)
    assert len(trainer.get_train_dataloader()) == 2
    trainer.train()
    assert [entry["step"] for entry in _evals(trainer)] == [2, 4, 5]


def test_load_best_model_at_end_restores_the_lowest_kl_checkpoint(tmp_path, teachers):
    """`load_best_model_at_end` with `metric_for_best_model="kl/b"`: `greater_is_better` defaults to False for the
    KL, the best checkpoint is the step of the lowest logged `eval_kl/b`, and the student ends with that checkpoint's
    weights."""
    trainer = _opd(
        tmp_path,
        teachers,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="kl/b",
        learning_rate=0.3,  # large steps, so that the KL does not simply fall step after step
        ema=False,
    )
    assert trainer.args.greater_is_better is False
    trainer.train()
    values = {entry["step"]: entry["eval_kl/b"] for entry in _evals(trainer)}
    assert sorted(values) == [1, 2, 3]
    best = min(values, key=values.get)
    assert trainer.state.best_model_checkpoint == str(tmp_path / "out" / f"checkpoint-{best}")
    assert trainer.state.best_metric == pytest.approx(values[best])
    assert best < 3  # at this lr the KL rises after the first step (0.03, 0.22, 0.29 on one machine)
    folder = tmp_path / "out"
    saved = load_file(str(folder / f"checkpoint-{best}" / "student_training_weights.safetensors"))
    last = load_file(str(folder / "checkpoint-3" / "student_training_weights.safetensors"))
    current = trainer.student_state_dict()
    assert saved.keys() == current.keys()
    assert all(torch.equal(saved[key], current[key]) for key in saved)
    assert not all(torch.equal(last[key], current[key]) for key in last)


def test_eval_strategy_without_eval_prompts_is_one_line(tmp_path, teachers):
    with pytest.raises(
        ValueError, match=r"^`eval_strategy='steps'` needs held-out prompts: pass `eval_dataset`[^\n]*$"
    ):
        _opd(tmp_path, teachers, eval_dataset=None, eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match=r"^`eval_strategy='epoch'` needs held-out prompts"):
        _rl(FlowGRPOTrainer, FlowGRPOConfig, tmp_path, None, eval_strategy="epoch")


def test_unknown_metric_for_best_model_is_one_line(tmp_path, teachers):
    with pytest.raises(
        ValueError, match=r"'eval_reward', which DiffusionOPDTrainer.evaluate\(\) does not report; .*'kl/a'"
    ):
        _opd(tmp_path, teachers, metric_for_best_model="eval_reward")
    # transformers' default metric with `load_best_model_at_end`, "loss", is no metric of a Stage-1 evaluation
    with pytest.raises(
        ValueError, match=r"'loss', which FlowGRPOTrainer.evaluate\(\) does not report; choose one of "
    ):
        _rl(
            FlowGRPOTrainer,
            FlowGRPOConfig,
            tmp_path,
            ["grey ring"],
            eval_strategy="steps",
            save_strategy="steps",
            load_best_model_at_end=True,
        )


@pytest.mark.parametrize(
    "trainer_class, config_class, extra",
    [(FlowGRPOTrainer, FlowGRPOConfig, {"noise_level": 0.7}), (DiffusionNFTTrainer, DiffusionNFTConfig, {})],
)
def test_stage1_evaluates_the_rewards_of_the_student_on_the_eval_prompts(tmp_path, trainer_class, config_class, extra):
    """Stage 1: every eval step logs the mean of each reward function over one deterministic (ODE) sample per held-out
    prompt, per task and over all, and their weighted total; at the end they are the rewards of the final student's
    own `generate` samples scored by hand."""
    eval_prompts = {"x": ["grey ring", "black dot", "white star"], "y": ["red moon"]}
    trainer = _rl(
        trainer_class,
        config_class,
        tmp_path,
        eval_prompts,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=2,
        reward_weights=[1.0, 0.5],
        **extra,
    )
    trainer.train()
    evals = _evals(trainer)
    assert [entry["step"] for entry in evals] == [1, 2]
    assert evals[0]["eval_rewards/brightness"] != evals[1]["eval_rewards/brightness"]
    last = evals[-1]
    expected = {"brightness": [], "saturation": []}
    for task, prompts in eval_prompts.items():
        # the evaluation's batches of 2 prompts, each with its own seed (0, 1, 2)
        batches = [prompts[i : i + 2] for i in range(0, len(prompts), 2)]
        offset = 0 if task == "x" else 2
        images = [image for i, batch in enumerate(batches) for image in trainer.generate(batch, seed=offset + i)]
        for name in expected:
            scores = get_reward(name)(images, prompts, [{"prompt": p} for p in prompts])
            assert last[f"eval_rewards/{task}/{name}"] == pytest.approx(sum(scores) / len(scores), rel=1e-5)
            expected[name] += list(scores)
    for name, scores in expected.items():
        assert last[f"eval_rewards/{name}"] == pytest.approx(sum(scores) / len(scores), rel=1e-5)
    total = [b + 0.5 * s for b, s in zip(expected["brightness"], expected["saturation"])]
    assert last["eval_reward"] == pytest.approx(sum(total) / len(total), rel=1e-5)


def test_stage1_best_model_by_reward(tmp_path):
    """`metric_for_best_model="rewards/brightness"`: greater is better (transformers' default for a name not ending
    in "loss"), and the best checkpoint is the step of the highest logged brightness."""
    trainer = _rl(
        FlowGRPOTrainer,
        FlowGRPOConfig,
        tmp_path,
        ["grey ring", "black dot"],
        max_steps=3,
        noise_level=0.7,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="rewards/brightness",
    )
    assert trainer.args.greater_is_better is True
    trainer.train()
    values = {entry["step"]: entry["eval_rewards/brightness"] for entry in _evals(trainer)}
    best = max(values, key=values.get)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")


def test_cli_eval_strategy_steps(tmp_path):
    """The issue's reproduction, shortened: `train --config tiny.yaml --eval_strategy steps` evaluates on the YAML's
    `eval_prompts` and writes the eval metrics to the checkpoint's `trainer_state.json`; without eval prompts the
    command stops with one line."""
    config = Path(__file__).parents[1] / "examples" / "configs" / "tiny.yaml"
    out = tmp_path / "run"
    flags = ["--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--num_inference_steps", "2"]
    flags += ["--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "true"]
    assert cli_main(["train", "--config", str(config), *flags]) == 0
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    evals = [entry for entry in history if "eval_kl" in entry]
    assert [entry["step"] for entry in evals] == [1, 2]
    assert all(math.isfinite(entry[f"eval_kl/{task}"]) for entry in evals for task in ("shapes", "text"))


def test_cli_eval_strategy_without_eval_prompts(tmp_path, capsys):
    config = Path(__file__).parents[1] / "examples" / "configs" / "tiny_grpo.yaml"
    out = tmp_path / "run"
    code = cli_main(["grpo", "--config", str(config), "--eval_strategy", "steps", "--output_dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trl-diffusion-opd grpo: error: `eval_strategy='steps'` needs held-out prompts")
    assert "\n" not in err
    assert not out.exists()
