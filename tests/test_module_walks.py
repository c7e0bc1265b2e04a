"""A round's bookkeeping does not walk every teacher's modules (`trainer.module_walks`), and the result is the same
to the bit as with torch's `eval()`, `zero_grad()` and the Trainer's clipping over `model.parameters()`."""

import contextlib

import pytest
import torch
import transformers
from peft import LoraConfig

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora
from trl_diffusion_opd.trainer import base_trainer, module_walks, opd_trainer


TASKS = ["t0", "t1", "t2"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    for index, task in enumerate(TASKS):
        save_toy_lora(pipe, folder / task, seed=10 + index, rank=2, std=0.2)
    return {task: str(folder / task) for task in TASKS}


def _trainer(tmp_path, teachers, **kwargs):
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        resolution=32,
        num_inference_steps=4,
        per_device_train_batch_size=2,
        max_sequence_length=1,
        learning_rate=3e-3,
        max_grad_norm=1e-5,  # below every round's norm: the clip scales the update
        logging_steps=1,
        save_strategy="no",
        ema=False,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        teachers,
        args=args,
        train_dataset={task: [f"{task} prompt {i}" for i in range(4)] for task in TASKS},
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["attn.to_q"]),
    )
    return trainer


def _train(tmp_path, teachers, **kwargs):
    trainer = _trainer(tmp_path, teachers, **kwargs)
    trainer.train()
    logs = [(log["loss"], log["grad_norm"]) for log in trainer.state.log_history if "loss" in log]
    return trainer, {k: v.clone() for k, v in trainer.student_state_dict().items()}, logs


@pytest.mark.parametrize("extra", [{}, {"tasks_per_round": 2, "rows_per_round": 4}], ids=["round-robin", "mixed"])
def test_rounds_are_bit_identical_to_the_walks_over_every_module(tmp_path, teachers, monkeypatch, extra):
    _, fast, fast_logs = _train(tmp_path / "fast", teachers, **extra)
    # The previous bookkeeping: `model.eval()` every round, the Trainer's clip and `zero_grad` over all parameters.
    monkeypatch.setattr(opd_trainer, "ensure_eval", lambda model: model.eval())
    monkeypatch.setattr(base_trainer.DiffusionLoRATrainer, "_clip_grad_norm", transformers.Trainer._clip_grad_norm)
    monkeypatch.setattr(module_walks.StudentGrads, "installed", lambda self: contextlib.nullcontext(self))
    _, walked, walked_logs = _train(tmp_path / "walked", teachers, **extra)
    assert len(fast_logs) == 3 and fast_logs == walked_logs
    assert all(norm > 1e-5 for _, norm in fast_logs)  # the clip was active
    assert fast.keys() == walked.keys()
    assert all(torch.equal(fast[name], walked[name]) for name in fast)


def test_a_round_walks_no_module_and_zero_grad_is_restored(tmp_path, teachers, monkeypatch):
    trainer = _trainer(tmp_path, teachers, tasks_per_round=2, rows_per_round=4)
    trainer.model.eval()  # the teachers' adapter modules are created in training mode: the first round's check finds them
    calls = []
    for name in ("train", "zero_grad"):
        original = getattr(torch.nn.Module, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, name, spy)
    trainer.train()
    assert trainer.state.global_step == 3
    assert calls == []  # no `eval()` (it is `train(False)`) and no `Module.zero_grad` in three rounds
    assert "zero_grad" not in vars(trainer.model)  # the student-only `zero_grad` was installed for `train()` only
    assert all(param.grad is None for param in trainer.model.parameters())


def test_ensure_eval_finds_any_module_in_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleDict({"a": torch.nn.Dropout(0.5)}))
    model.eval()
    module_walks.ensure_eval(model)
    assert not any(module.training for module in model.modules())
    model[1]["a"].train()  # a submodule flipped by someone else
    module_walks.ensure_eval(model)
    assert not model[1]["a"].training
    model[1]["b"] = torch.nn.Dropout(0.5)  # a module added after the list was cached, in training mode
    assert model[1]["b"].training
    module_walks.ensure_eval(model)
    assert not model[1]["b"].training


def test_student_grads_clear_only_the_trainable_parameters_in_model_order():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    grads = module_walks.StudentGrads(model)
    assert grads.parameters == [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    model(torch.ones(1, 2)).sum().backward()
    with grads.installed():
        model.zero_grad()
    assert all(param.grad is None for param in model.parameters())
    assert "zero_grad" not in vars(model)
