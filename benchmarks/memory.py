"""Activation memory of the student's forward+backward at SD3.5-Medium size, counted on the meta device.

The tensors autograd saves for the backward of one row (one latent, one prompt) are counted with
`torch.autograd.graph.saved_tensors_hooks` while the transformer runs on meta tensors: shapes and dtypes only, no
memory, no compute, so this runs on any CPU in seconds. On the meta device attention takes PyTorch's math path,
which saves the L x L attention probabilities that flash / memory-efficient kernels on a GPU do not keep; they are
reported separately. Saved tensors that alias one buffer (views) are counted once each time they are saved, so the
numbers are upper bounds.
"""

from __future__ import annotations

import torch


GIB = 2**30


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters of `module` (`parameters()` yields a tied weight once)."""
    return sum(p.numel() for p in module.parameters())


def weight_sizes(transformer: int, text_encoder: int) -> dict[str, float]:
    """Parameters (billions) and bf16 weight sizes (GiB) from parameter counts."""
    return {
        "transformer_params_b": transformer / 1e9,
        "transformer_bf16_gib": 2 * transformer / GIB,
        "text_encoder_params_b": text_encoder / 1e9,
        "text_encoder_bf16_gib": 2 * text_encoder / GIB,
    }


def add_student_lora(transformer, targets, lora_rank: int, checkpointing: bool = False) -> None:
    """Freeze `transformer` and add the student LoRA (r`lora_rank`, alpha 2r, on `targets`) with float32 weights that
    require grad, as the trainer does; `checkpointing` enables the model's gradient checkpointing (per block)."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets), "student")
    for name, param in transformer.named_parameters():
        if ".student." in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    if checkpointing:
        transformer.enable_gradient_checkpointing()


def saved_activations_per_row(
    config: dict,
    resolution: int = 512,
    text_tokens: int = 77 + 128,
    dtype: torch.dtype = torch.bfloat16,
    lora_rank: int = 32,
    targets: list[str] | None = None,
    checkpointing: bool = False,
) -> dict[str, float]:
    """GiB saved for backward by one row of the student forward (LoRA r`lora_rank` in float32 on a `dtype` base).

    Returns:
        `{"total_gib", "attention_probs_gib", "without_attention_probs_gib", "tokens"}`.
    """
    from diffusers import SD3Transformer2DModel

    from trl_diffusion_opd.families.sd3 import SD3Family

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config).to(dtype)
    add_student_lora(transformer, targets or SD3Family.default_lora_targets, lora_rank, checkpointing)
    side = resolution // 8
    image_tokens = (side // config["patch_size"]) ** 2
    tokens = image_tokens + text_tokens
    totals = {"all": 0, "probs": 0}

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        totals["all"] += size
        if tensor.dim() >= 2 and tensor.shape[-1] in (tokens, image_tokens) and tensor.shape[-2] == tensor.shape[-1]:
            totals["probs"] += size
        return tensor

    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        transformer(
            hidden_states=torch.randn(1, config["in_channels"], side, side, dtype=dtype),
            timestep=torch.full((1,), 500.0, dtype=dtype),
            encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], dtype=dtype),
            pooled_projections=torch.randn(1, config["pooled_projection_dim"], dtype=dtype),
            return_dict=False,
        )
    gib = 2.0**30
    return {
        "total_gib": totals["all"] / gib,
        "attention_probs_gib": totals["probs"] / gib,
        "without_attention_probs_gib": (totals["all"] - totals["probs"]) / gib,
        "tokens": tokens,
    }
