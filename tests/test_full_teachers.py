"""Full-weight teachers: frozen modules beside the shared base, exact, offloadable, mixable with LoRA teachers."""

import pytest
import torch
from peft import LoraConfig

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora


PROMPTS = {"a": ["a red circle", "a blue square", "two cats"], "b": ["the letter k", "a sign that says hi", "xyz"]}


def _config(tmp_path, **kwargs):
    values = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "resolution": 32,
        "num_inference_steps": 3,
        "per_device_train_batch_size": 2,
        "max_sequence_length": 1,
        "save_strategy": "no",
        "ema": False,
        "report_to": "none",
        "disable_tqdm": True,
    }
    values.update(kwargs)
    return DiffusionOPDConfig(**values)


@pytest.fixture
def teacher_folders(tmp_path):
    """The same teacher twice: as a LoRA, and as a full transformer with that LoRA fused in."""
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    lora = save_toy_lora(pipe, tmp_path / "lora", seed=3, std=0.2)
    fused = get_tiny_sd3_pipeline(with_t5=False)
    fused.load_lora_weights(lora)
    fused.fuse_lora()
    fused.unload_lora_weights()
    fused.transformer.save_pretrained(tmp_path / "full" / "transformer")
    other = save_toy_lora(pipe, tmp_path / "other", seed=4, std=0.2)
    return {"lora": str(lora), "full": str(tmp_path / "full"), "other": str(other)}


def _trainer(tmp_path, teachers, **kwargs):
    return DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        teachers,
        args=_config(tmp_path, **kwargs),
        train_dataset=PROMPTS,
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["attn.to_q"]),
    )


def _means(trainer, task):
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, t_next = torch.full((4,), 0.8), torch.full((4,), 0.6)
    cond = trainer.prompt_cache(["a red circle", "xyz", "two cats", "hi"])
    spec = trainer.teacher_specs[task][0]
    return trainer.teacher_means(spec, task, x, t, t_next, cond, 0.9)


def test_full_teacher_reproduces_its_lora_twin(tmp_path, teacher_folders):
    trainer = _trainer(tmp_path, {"a": teacher_folders["full"], "b": teacher_folders["lora"]})
    assert list(trainer.full_teachers) == ["a"]
    full, lora = _means(trainer, "a"), _means(trainer, "b")
    torch.testing.assert_close(full, lora, rtol=1e-5, atol=1e-5)
    # One copy of the base carries the student and LoRA teachers; the full teacher is its own frozen module.
    assert all(not p.requires_grad for p in trainer.full_teachers["a"].parameters())
    assert not any(".a." in n for n, _ in trainer.model.named_parameters())


def test_full_teacher_given_as_a_module(tmp_path, teacher_folders):
    module = get_tiny_sd3_pipeline(with_t5=False).transformer  # the plain base, as a separate module
    trainer = _trainer(tmp_path, {"a": module, "b": teacher_folders["lora"]})
    assert trainer.full_teachers["a"] is module
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, t_next = torch.full((4,), 0.8), torch.full((4,), 0.6)
    cond = trainer.prompt_cache(["a red circle", "xyz", "two cats", "hi"])
    with torch.no_grad(), trainer.adapters.use(None):  # the shared base with every adapter off
        base = trainer._mean(trainer.model, x, t, t_next, cond, trainer.student_guidance, 0.9)
    torch.testing.assert_close(_means(trainer, "a"), base, rtol=1e-5, atol=1e-6)
    assert (_means(trainer, "b") - base).abs().max() > 1e-4


def test_mixed_lora_and_full_teachers_train_and_offload_changes_nothing(tmp_path, teacher_folders):
    teachers = {"a": teacher_folders["full"], "b": teacher_folders["other"]}
    losses = {}
    for flag in (False, True):
        trainer = _trainer(tmp_path / str(flag), teachers, teacher_offload=flag, seed=1)
        start = [p.detach().clone() for p in trainer.student_parameters]
        teacher_start = [p.detach().clone() for p in trainer.full_teachers["a"].parameters()]
        trainer.train()
        losses[flag] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert any(not torch.equal(a, b) for a, b in zip(start, trainer.student_parameters))
        assert all(torch.equal(a, b) for a, b in zip(teacher_start, trainer.full_teachers["a"].parameters()))
        device = next(trainer.full_teachers["a"].parameters()).device
        assert device.type == "cpu"
    assert losses[False] == pytest.approx(losses[True], rel=1e-6)
    assert len(losses[False]) == 2
