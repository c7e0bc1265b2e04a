"""Memory paths on the tiny SD3: gradient checkpointing, a bf16 base with a float32 student, and a base whose Linear
layers are bitsandbytes 4-bit (QLoRA-style) training a LoRA student on the CPU."""

import math

import pytest
import torch
from peft import LoraConfig

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora


TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
PROMPTS = ["a red circle", "two cats"]


def _args(output_dir, **kwargs) -> DiffusionOPDConfig:
    defaults = {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "ema": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "max_sequence_length": 1,
        "resolution": 32,
        "num_inference_steps": 4,
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    return str(save_toy_lora(pipe, tmp_path_factory.mktemp("teacher"), seed=1, std=0.3, target_modules=TARGETS))


def _trainer(pipe, teacher, output_dir, **kwargs) -> DiffusionOPDTrainer:
    return DiffusionOPDTrainer(
        pipe,
        {"geneval": teacher},
        args=_args(output_dir, **kwargs),
        train_dataset={"geneval": PROMPTS},
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS),
    )


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def _changed(module, before) -> set[str]:
    return {name for name, param in module.named_parameters() if not torch.equal(param, before[name])}


def _student_names(module) -> set[str]:
    return {name for name, _ in module.named_parameters() if ".student." in name}


def _train_and_check(trainer) -> None:
    """Train, then assert the loss was finite, the whole student moved and nothing else did."""
    transformer = trainer.pipeline.transformer
    before = _snapshot(transformer)
    output = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == trainer.args.max_steps
    assert all(math.isfinite(loss) and loss > 0 for loss in losses) and math.isfinite(output.training_loss)
    changed = _changed(transformer, before)
    assert changed == _student_names(transformer), sorted(changed ^ _student_names(transformer))[:4]


# ---------------------------------------------------------------------- gradient checkpointing
def _one_round(teacher, output_dir, gradient_checkpointing: bool):
    """Loss and student gradients of one task's round, and how many blocks went through checkpointing."""
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    trainer = _trainer(pipe, teacher, output_dir, gradient_checkpointing=gradient_checkpointing)
    transformer = pipe.transformer
    # A freshly initialised LoRA has B = 0, so A would get no gradient: give the student non-zero weights, the same
    # in both runs.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in trainer.student_parameters:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))

    calls = []
    if gradient_checkpointing:
        original = transformer._gradient_checkpointing_func

        def counting(block, *args):
            calls.append(type(block).__name__)
            return original(block, *args)

        transformer._gradient_checkpointing_func = counting
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
    rows = [{"prompt": p} for p in PROMPTS]
    loss, kl = trainer.task_loss(trainer.model, "geneval", rows, torch.Generator().manual_seed(7), backward=True)
    grads = [param.grad.detach().clone() for param in trainer.student_parameters]
    return trainer, loss, kl, grads, calls


def test_gradient_checkpointing_is_active_and_exact(teacher, tmp_path):
    trainer, loss, kl, grads, _ = _one_round(teacher, tmp_path / "plain", gradient_checkpointing=False)
    plain = trainer.pipeline.transformer
    trainer, ckpt_loss, ckpt_kl, ckpt_grads, calls = _one_round(
        teacher, tmp_path / "ckpt", gradient_checkpointing=True
    )
    ckpt = trainer.pipeline.transformer

    assert not plain.gradient_checkpointing
    assert ckpt.gradient_checkpointing
    # Only the student's grad-enabled forwards are checkpointed, one call per block and forward (teachers run without
    # grad): with the fused on-policy pass (the default) the rollout's forward at each of the T trained steps.
    steps = trainer.args.num_train_timesteps
    assert calls == ["JointTransformerBlock"] * len(ckpt.transformer_blocks) * steps

    assert loss > 0 and math.isclose(loss, ckpt_loss, rel_tol=1e-5)
    torch.testing.assert_close(kl, ckpt_kl, rtol=1e-5, atol=0)
    adapted = [n for n, _ in plain.named_modules() if n.endswith(tuple(f".{t}" for t in TARGETS))]
    assert len(grads) == len(ckpt_grads) == 2 * len(adapted)  # lora_A and lora_B of every adapted layer
    for g, h in zip(grads, ckpt_grads):
        assert g.abs().max() > 0
        assert (g - h).abs().max() <= 1e-5 * g.abs().max()

    # It stays on through `train()`: every round's student forward is checkpointed.
    calls.clear()
    trainer.train()
    assert calls == ["JointTransformerBlock"] * len(ckpt.transformer_blocks) * steps * trainer.args.max_steps


def test_activation_checkpointing_name_enables_it_too(teacher, tmp_path):
    """transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing`; either enables diffusers'
    checkpointing, and `train()` must not call the `activation_checkpointing_enable` diffusers models lack."""
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    trainer = _trainer(pipe, teacher, tmp_path, activation_checkpointing=True, max_steps=1)
    assert pipe.transformer.gradient_checkpointing
    calls = []
    original = pipe.transformer._gradient_checkpointing_func
    pipe.transformer._gradient_checkpointing_func = lambda block, *args: calls.append(block) or original(block, *args)
    trainer.train()
    # one checkpointed call per block and grad-enabled forward: the fused rollout's forward at each trained step
    assert len(calls) == len(pipe.transformer.transformer_blocks) * trainer.args.num_train_timesteps


# ---------------------------------------------------------------------- bf16 base
def test_bf16_base_keeps_float32_student_and_trains(teacher, tmp_path):
    pipe = get_tiny_sd3_pipeline(with_t5=False).to(torch.bfloat16)
    trainer = _trainer(pipe, teacher, tmp_path)
    transformer = pipe.transformer
    students = _student_names(transformer)
    dtypes = {name: param.dtype for name, param in transformer.named_parameters()}
    assert students and all(dtypes[name] == torch.float32 for name in students)
    assert all(dtype == torch.bfloat16 for name, dtype in dtypes.items() if name not in students)
    assert all(param.dtype == torch.float32 for param in trainer.student_parameters)
    assert trainer.family.dtype == torch.bfloat16
    _train_and_check(trainer)
    assert all(param.dtype == torch.float32 for param in trainer.student_parameters)


# ---------------------------------------------------------------------- 4-bit base
def _quantize_linears_4bit(module: torch.nn.Module) -> int:
    """Replace every `nn.Linear` under `module` with a bitsandbytes NF4 `Linear4bit` holding the same weights.

    diffusers' own `BitsAndBytesConfig` loading needs a GPU, so this does by hand what its quantizer does.
    """
    import bitsandbytes as bnb

    count = 0
    for name, child in list(module.named_children()):
        if not isinstance(child, torch.nn.Linear):
            count += _quantize_linears_4bit(child)
            continue
        layer = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=torch.float32,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
        setattr(module, name, layer.to("cpu"))  # quantizes
        count += 1
    return count


def test_4bit_base_trains_lora_student_on_cpu(teacher, tmp_path):
    """On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks an eval-mode `Linear4bit` on its first no-grad forward
    (the rollout) for an inference-only kernel: it fails for in_features < 64 and, for larger layers, the student's
    gradient can no longer pass through the layer. The trainer must keep the differentiable path."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    pipe = get_tiny_sd3_pipeline(with_t5=False)
    transformer = pipe.transformer
    assert _quantize_linears_4bit(transformer.transformer_blocks) > 0
    transformer.is_loaded_in_4bit = True  # what diffusers' bitsandbytes quantizer sets; PEFT dispatches on it
    quantized = {name: m for name, m in transformer.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    packed = {name: m.weight.detach().clone() for name, m in quantized.items()}
    assert all(w.dtype == torch.uint8 for w in packed.values())
    dequantized = {
        name: bnb.functional.dequantize_4bit(m.weight, m.weight.quant_state) for name, m in quantized.items()
    }

    trainer = _trainer(pipe, teacher, tmp_path, max_steps=3)
    # PEFT wrapped each adapted quantized layer with its 4-bit LoRA layer.
    adapted = {n for n, m in transformer.named_modules() if isinstance(m, LoraLinear4bit)}
    assert adapted == {n for n in quantized if n.endswith(tuple(f".{t}" for t in TARGETS))} != set()
    assert all(param.dtype == torch.float32 for param in trainer.student_parameters)
    _train_and_check(trainer)

    # The quantized base is untouched: same packed 4-bit storage, same dequantized weights.
    for name, module in quantized.items():
        assert torch.equal(module.weight, packed[name]), name
        assert torch.equal(bnb.functional.dequantize_4bit(module.weight, module.weight.quant_state), dequantized[name])
