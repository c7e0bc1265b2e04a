"""DiffusionOPDTrainer on the tiny SD3 pipeline: it touches only the student, saves, resumes and fails fast (its
distillation, like every family's, is checked by `tests/test_family_contract.py`)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora

from helpers import random_word_prompts as _prompts


ATTENTION = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]


def _config(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "resolution": 32,
        "num_inference_steps": 4,
        "per_device_train_batch_size": 2,
        "max_sequence_length": 1,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "save_strategy": "no",
        "ema": False,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    }
    defaults.update(kwargs)
    return DiffusionOPDConfig(**defaults)


@pytest.fixture
def teachers(tmp_path):
    """Two toy teachers sharing half of their update (as teachers RL-tuned from one base do), one per format."""
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    common = {"std": 0.1, "rank": 2, "shared_seed": 7, "specific_scale": 0.3}
    save_toy_lora(pipe, tmp_path / "teacher_a", seed=1, **common)
    save_toy_lora(pipe, tmp_path / "teacher_b", seed=2, format="peft", **common)
    return {"a": str(tmp_path / "teacher_a"), "b": str(tmp_path / "teacher_b")}


def _trainer(tmp_path, teachers, prompts=None, peft_config=None, **kwargs):
    return DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        teachers,
        args=_config(tmp_path, **kwargs),
        train_dataset=prompts or _prompts(8),
        peft_config=peft_config
        or LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=ATTENTION),
    )


def _snapshot(trainer):
    """Every parameter of the model and every teacher weight in the bank (`teacher.<name>.<key>`)."""
    out = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    bank = trainer.teacher_bank
    return out | {f"teacher.{t}.{k}": v.clone() for t in bank.names for k, v in bank.weights(t).items()}


def test_only_the_student_changes_and_the_optimizer_holds_only_it(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, max_steps=3)
    start = _snapshot(trainer)
    trainer.train()
    end = _snapshot(trainer)
    student = {n for n in start if ".student." in n}
    teacher = {n for n in start if n.startswith(("teacher.a.", "teacher.b."))}
    assert student and teacher
    for name in start:
        if name in student:
            continue
        assert torch.equal(start[name], end[name]), f"{name} changed"
    unchanged = sorted(n for n in student if ".lora_B." in n and torch.equal(start[n], end[n]))
    # The last SD3 block is context_pre_only: its context queries only feed context outputs that are discarded.
    assert unchanged == ["transformer_blocks.1.attn.add_q_proj.lora_B.student.weight"]
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.student_parameters}
    assert all(p.dtype == torch.float32 for p in trainer.student_parameters)


class _Counter(TrainerCallback):
    def __init__(self):
        self.optimizer_steps = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps += 1


def test_one_optimizer_step_per_round_over_all_tasks(tmp_path, teachers):
    teachers = {**teachers, "c": teachers["a"]}
    prompts = {**_prompts(4), "c": ["one more task", "and another"]}
    trainer = _trainer(tmp_path, teachers, prompts=prompts, max_steps=2)
    counter = _Counter()
    trainer.add_callback(counter)
    visited = []
    task_loss = trainer.task_loss

    def spy(model, task, rows, generator, backward):
        visited.append((trainer.state.global_step, task, len(rows)))
        return task_loss(model, task, rows, generator, backward)

    trainer.task_loss = spy
    trainer.train()
    assert counter.optimizer_steps == 2
    assert trainer.state.global_step == 2
    assert visited == [(0, "a", 2), (0, "b", 2), (0, "c", 2), (1, "a", 2), (1, "b", 2), (1, "c", 2)]


def test_task_weight_scales_that_task_loss_and_gradient(tmp_path, teachers):
    rows = [{"prompt": p} for p in _prompts(2)["a"]]
    results = {}
    for weight in (1.0, 3.0):
        trainer = _trainer(tmp_path, teachers, task_weights={"a": weight})
        with torch.no_grad():  # a non-zero student, so that the gradient is not trivially shaped
            for p in trainer.student_parameters:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        loss, kl = trainer.task_loss(trainer.model, "a", rows, trainer._generator("w"), backward=True)
        grads = torch.cat([p.grad.flatten() for p in trainer.student_parameters])
        results[weight] = (loss, kl, grads)
    assert results[3.0][0] == pytest.approx(3 * results[1.0][0], rel=1e-5)
    torch.testing.assert_close(results[3.0][1], results[1.0][1])  # the logged KL is unweighted
    torch.testing.assert_close(results[3.0][2], 3 * results[1.0][2], rtol=1e-4, atol=1e-10)


def test_logs_kl_per_task_and_per_step(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, max_steps=2, logging_steps=1)
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", "grad_norm", "learning_rate", "kl/a", "kl/b", "loss/a", "round_time"):
        assert key in logged, key
    steps = trainer.args.num_train_timesteps
    assert steps == 3  # floor(4 * 0.99)
    assert [f"kl_step/{j}" in logged for j in range(4)] == [True, True, True, False]
    assert logged["loss"] == pytest.approx(logged["loss/a"] + logged["loss/b"], rel=1e-4)


def test_saved_adapter_loads_in_diffusers_and_reproduces_the_student(tmp_path, teachers):
    # alpha != r: a save that dropped the adapter metadata would reload with the wrong scale.
    peft_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=ATTENTION)
    trainer = _trainer(tmp_path, teachers, peft_config=peft_config, max_steps=3)
    trainer.train()
    trainer.save_model()
    out = Path(trainer.args.output_dir)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not list(out.glob("*teacher*")) and not (out / "transformer").exists()

    fresh = get_tiny_sd3_pipeline(with_t5=False)
    fresh.load_lora_weights(out)
    family = trainer.family
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4])
    cond = trainer.prompt_cache(["a red circle", "the letter k"])
    with torch.no_grad():
        expected = family.velocity(trainer.model, x, sigma, cond)
        base = family.velocity(get_tiny_sd3_pipeline(with_t5=False).transformer, x, sigma, cond)
        got = family.velocity(fresh.transformer, x, sigma, cond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (expected - base).abs().max() > 1e-4  # the adapter does something


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, teachers):
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "ema": True, "ema_update_interval": 1}
    straight = _trainer(tmp_path / "straight", teachers, **settings)
    straight.train()

    interrupted = _trainer(tmp_path / "resumed", teachers, **settings)
    interrupted.add_callback(_StopAt(2))
    interrupted.train()
    assert interrupted.state.global_step == 2
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    assert (checkpoint / "README.md").is_file()

    resumed = _trainer(tmp_path / "resumed", teachers, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for a, b in zip(straight.student_parameters, resumed.student_parameters):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The interrupted run's weights at step 2 really differ from the final ones.
    assert any(not torch.allclose(a, b) for a, b in zip(interrupted.student_parameters, resumed.student_parameters))


def test_ema_weights_are_what_is_saved(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, max_steps=2, ema=True, ema_update_interval=1, ema_decay=0.5)
    trainer.train()
    trainer.save_model()
    from safetensors.torch import load_file

    saved = load_file(str(Path(trainer.args.output_dir) / "pytorch_lora_weights.safetensors"))
    live = trainer.student_state_dict()
    shadow = dict(zip([n for n, p in trainer.model.named_parameters() if ".student." in n], trainer.ema.shadow_params))
    key = next(k for k in live if "lora_B" in k)
    saved_key = "transformer." + key
    name = next(n for n in shadow if n.replace(".student", "") == key)
    torch.testing.assert_close(saved[saved_key], shadow[name].cpu())
    assert not torch.allclose(saved[saved_key], live[key])


def test_ppo_style_loss_trains(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, max_steps=2, loss_type="ppo", noise_level=0.7)
    start = _snapshot(trainer)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert any(not torch.equal(start[n], p) for n, p in trainer.model.named_parameters() if ".student." in n)


def test_row_routed_by_metadata_is_supervised_by_the_named_teacher(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers)
    prompt = "shared prompt"
    model = trainer.model
    _, own = trainer.task_loss(model, "a", [{"prompt": prompt}], trainer._generator("r"), backward=False)
    _, routed = trainer.task_loss(
        model, "a", [{"prompt": prompt, "teachers": ["b"]}], trainer._generator("r"), backward=False
    )
    _, teacher_b = trainer.task_loss(model, "b", [{"prompt": prompt}], trainer._generator("r"), backward=False)
    torch.testing.assert_close(routed, teacher_b, rtol=1e-6, atol=0)  # B's means are the target
    assert (routed - own).abs().max() > 1e-3 * own.abs().max()
    # A batch mixing routed and default rows: each row keeps its own teacher.
    _, mixed = trainer.task_loss(
        model,
        "a",
        [{"prompt": prompt, "teachers": "b"}, {"prompt": prompt}],
        trainer._generator("m"),
        backward=False,
    )
    _, mixed_a = trainer.task_loss(
        model, "a", [{"prompt": prompt, "teachers": "a"}, {"prompt": prompt}], trainer._generator("m"), backward=False
    )
    assert not torch.allclose(mixed, mixed_a)


def test_unknown_routed_teacher_fails_with_row_index(tmp_path, teachers):
    prompts = _prompts(3)
    prompts["a"] = [{"prompt": p} for p in prompts["a"]]
    prompts["a"][2]["teachers"] = ["b", "ocr"]
    with pytest.raises(ValueError, match=r"Task 'a' row 2 .* unknown teacher\(s\) \['ocr'\]"):
        _trainer(tmp_path, teachers, prompts=prompts)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"noise_level": -0.1}, "noise_level"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"timestep_fraction": 0.0}, "timestep_fraction"),
        ({"timestep_fraction": 1.5}, "timestep_fraction"),
        ({"loss_type": "ppo", "noise_level": 0.0}, "noise_level > 0"),
        ({"kl_normalization": "nope"}, "kl_normalization"),
        ({"task_weights": '{"a": -1}'}, "task_weights"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **kwargs)


def test_config_accepts_json_dicts(tmp_path):
    config = _config(tmp_path, task_weights='{"a": 2}', teacher_guidance_scale='{"a": 1.0}', guidance_scale=4.5)
    assert config.task_weights == {"a": 2}
    assert config.teacher_guidance_for("a") == 1.0 and config.teacher_guidance_for("b") == 4.5


def test_task_without_teacher_fails_before_loading(tmp_path, teachers):
    with pytest.raises(ValueError, match=r"task\(s\) \['b'\] have no teacher"):
        _trainer(tmp_path, {"a": teachers["a"]})


def test_teacher_without_prompts_fails(tmp_path, teachers):
    with pytest.raises(ValueError, match=r"Teacher task\(s\) \['c'\] have no prompts"):
        _trainer(tmp_path, {**teachers, "c": teachers["a"]})


def test_teacher_for_another_model_fails_with_its_name(tmp_path, teachers):
    from safetensors.torch import save_file

    folder = tmp_path / "foreign"
    folder.mkdir()
    save_file(
        {
            "transformer.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
            "transformer.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2),
        },
        str(folder / "pytorch_lora_weights.safetensors"),
    )
    with pytest.raises(
        ValueError,
        match=r"Teacher 'b' .* does not fit this base: 1 of the 1 modules it adapts are not in its transformer",
    ):
        _trainer(tmp_path, {"a": teachers["a"], "b": str(folder)})


def test_unresolvable_teacher_names_it_and_the_offline_state(tmp_path, teachers, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match=r"Teacher 'b'.*nobody/missing.*offline"):
        _trainer(tmp_path, {"a": teachers["a"], "b": "nobody/missing"})


def test_non_finite_loss_stops_with_task_and_step_and_keeps_last_checkpoint(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, max_steps=4, save_strategy="steps", save_steps=1)

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # after checkpoint-2 was written
                with torch.no_grad():
                    trainer.student_parameters[0].fill_(float("nan"))

    trainer.add_callback(Poison())
    with pytest.raises(FloatingPointError, match=r"task 'a' at optimizer step 2"):
        trainer.train()
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-2"
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (Path(trainer.args.output_dir) / "checkpoint-3").exists()


# ---------------------------------------------------------------------------------------------- distributed

_DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from peft import LoraConfig
    from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
    from trl_diffusion_opd.testing import get_tiny_sd3_pipeline

    out, teacher_a, teacher_b = sys.argv[1:4]
    seen = []
    args = DiffusionOPDConfig(output_dir=out, max_steps=2, resolution=32, num_inference_steps=3,
                              per_device_train_batch_size=1, max_sequence_length=1, save_strategy="no", ema=False,
                              report_to="none", disable_tqdm=True)
    # N = 3: T = 2 fused student forwards through DDP before each backward
    prompts = {"a": [f"prompt a {i}" for i in range(8)], "b": [f"prompt b {i}" for i in range(8)]}
    trainer = DiffusionOPDTrainer(get_tiny_sd3_pipeline(with_t5=False), {"a": teacher_a, "b": teacher_b}, args=args,
                                  train_dataset=prompts,
                                  peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                         target_modules=["attn.to_q", "attn.to_v"]))
    original = trainer.task_loss
    def spy(model, task, rows, generator, backward):
        seen.extend(r["prompt"] for r in rows)
        return original(model, task, rows, generator, backward)
    trainer.task_loss = spy
    trainer.train()
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in trainer.student_parameters))
    rank = trainer.accelerator.process_index
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"digest": digest.hexdigest(), "prompts": seen,
                   "world": trainer.accelerator.num_processes}, f)
    # Tear the process group down explicitly: gloo threads left to interpreter exit can abort a rank.
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_process_run_keeps_student_identical_on_both_ranks(tmp_path, teachers):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    result = subprocess.run(
        [*command, str(script), str(out), teachers["a"], teachers["b"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Under heavy load a gloo rank can abort in its teardown ("terminate called without an active exception") after
    # every result is written; what this test checks is in those files, so only that exact teardown abort is let by.
    written = all((out / f"rank{r}.json").is_file() for r in range(2))
    teardown_abort = written and "terminate called without an active exception" in result.stderr
    assert result.returncode == 0 or teardown_abort, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert not set(ranks[0]["prompts"]) & set(ranks[1]["prompts"])  # each rank draws its own prompts


def test_prompts_are_embedded_once_and_text_encoders_leave(tmp_path, teachers):
    prompts = _prompts(3)
    trainer = _trainer(tmp_path, teachers, prompts=prompts, max_steps=2, prompt_cache_size=100)
    assert trainer.prompt_cache.encoders_offloaded
    assert len(trainer.prompt_cache) == 7  # 6 prompts + the negative prompt
    assert all(next(e.parameters()).device.type == "cpu" for e in trainer.family.text_encoders)
    calls = []
    encode = trainer.family.encode_prompts
    trainer.family.encode_prompts = lambda p: calls.append(list(p)) or encode(p)
    trainer.train()
    assert calls == []  # training never ran a text encoder
    cached = trainer.prompt_cache(["a brand new prompt"])
    assert calls == [["a brand new prompt"]]
    torch.testing.assert_close(cached["prompt_embeds"], encode(["a brand new prompt"])["prompt_embeds"])


def test_prompt_cache_evicts_least_recently_used(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, prompt_cache_size=3)
    assert not trainer.prompt_cache.encoders_offloaded  # 17 prompts do not fit in 3
    cache = trainer.prompt_cache
    cache(["p1", "p2", "p3"])
    cache(["p1"])
    cache(["p4"])
    assert list(cache._rows) == ["p3", "p1", "p4"]  # p2 was the least recently used
