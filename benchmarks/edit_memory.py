"""Student activations of the editing models at real size with their reference tokens, counted on the meta device.

Qwen-Image-Edit-2511 (`QwenImageTransformer2DModel`, 60 layers, `zero_cond_t`), FLUX.1 Kontext dev
(`FluxTransformer2DModel`, 19 + 38 blocks, guidance embedding) and FLUX.2 [klein] base 4B (`Flux2Transformer2DModel`):
published configs (`shared/reference/image_conditioning.md` section 7, `benchmarks/flux2_klein_memory.py`). One student
row is the generated image's tokens plus one ~1 MP reference's tokens (the pipelines encode references at ~1024² of
area: 4096 tokens) plus the text; what autograd saves for its backward through the transformer with an r32 float32
LoRA on the family's default targets is counted as `benchmarks/memory.py` does. On the meta device attention takes the
math path, whose L x L probabilities flash / memory-efficient kernels do not keep: they are reported apart.

    python -m benchmarks.edit_memory            # 512 and 1024 px output, one 1 MP reference
"""

from __future__ import annotations

import argparse

import torch

from .memory import GIB, add_student_lora, count_parameters


QWEN_EDIT_2511 = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
    "zero_cond_t": True,
}
KONTEXT_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# The pipelines bring a reference to ~1024² of area: 64 x 64 tokens after the VAE's 8x and 2x2 packing.
REFERENCE_TOKENS = 64 * 64


def _build(model: str):
    with torch.device("meta"):
        if model == "qwen-image-edit-2511":
            from diffusers import QwenImageTransformer2DModel

            from trl_diffusion_opd.families.qwenimage_edit import QwenImageEditPlusFamily

            return QwenImageTransformer2DModel(**QWEN_EDIT_2511).to(torch.bfloat16), QwenImageEditPlusFamily
        if model == "flux1-kontext-dev":
            from diffusers import FluxTransformer2DModel

            from trl_diffusion_opd.families.flux_kontext import FluxKontextFamily

            return FluxTransformer2DModel(**KONTEXT_DEV).to(torch.bfloat16), FluxKontextFamily
        from trl_diffusion_opd.families.flux2 import Flux2KleinFamily

        from .flux2_klein_memory import _transformer

    return _transformer("klein-4B"), Flux2KleinFamily


MODELS = ("qwen-image-edit-2511", "flux1-kontext-dev", "flux2-klein-base-4b")


def saved_activations_per_row(
    model: str, resolution: int = 1024, text_tokens: int = 512, lora_rank: int = 32, checkpointing: bool = False
) -> dict[str, float]:
    """GiB saved for backward by one student row of `model` (`MODELS`) with one ~1 MP reference.

    Returns:
        `{"total_gib", "attention_probs_gib", "without_attention_probs_gib", "tokens", "params_b"}`.
    """
    transformer, family = _build(model)
    params = count_parameters(transformer)
    add_student_lora(transformer, family.default_lora_targets, lora_rank, checkpointing)
    dtype = torch.bfloat16
    side = resolution // 16
    generated = side * side
    tokens = generated + REFERENCE_TOKENS + text_tokens
    totals = {"all": 0, "probs": 0}

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        totals["all"] += size
        if tensor.dim() >= 2 and tensor.shape[-1] == tokens and tensor.shape[-2] == tokens:
            totals["probs"] += size
        return tensor

    image = generated + REFERENCE_TOKENS
    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if model == "qwen-image-edit-2511":
            transformer(
                hidden_states=torch.randn(1, image, 64, dtype=dtype),
                timestep=torch.full((1,), 0.5, dtype=dtype),
                encoder_hidden_states=torch.randn(1, text_tokens, 3584, dtype=dtype),
                encoder_hidden_states_mask=None,
                img_shapes=[[(1, side, side), (1, 64, 64)]],
                return_dict=False,
            )
        elif model == "flux1-kontext-dev":
            transformer(
                hidden_states=torch.randn(1, image, 64, dtype=dtype),
                timestep=torch.full((1,), 0.5, dtype=dtype),
                guidance=torch.full((1,), 2.5, dtype=torch.float32),
                pooled_projections=torch.randn(1, 768, dtype=dtype),
                encoder_hidden_states=torch.randn(1, text_tokens, 4096, dtype=dtype),
                txt_ids=torch.zeros(text_tokens, 3),
                img_ids=torch.zeros(image, 3),
                return_dict=False,
            )
        else:
            transformer(
                hidden_states=torch.randn(1, image, 128, dtype=dtype),
                timestep=torch.full((1,), 0.5, dtype=dtype),
                guidance=None,
                encoder_hidden_states=torch.randn(1, text_tokens, 7680, dtype=dtype),
                txt_ids=torch.zeros(1, text_tokens, 4),
                img_ids=torch.zeros(1, image, 4),
                return_dict=False,
            )
    return {
        "total_gib": totals["all"] / GIB,
        "attention_probs_gib": totals["probs"] / GIB,
        "without_attention_probs_gib": (totals["all"] - totals["probs"]) / GIB,
        "tokens": tokens,
        "params_b": params / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--text_tokens", type=int, default=512)
    args = parser.parse_args()
    for model in args.models:
        for resolution in args.resolutions:
            for checkpointing in (False, True):
                act = saved_activations_per_row(model, resolution, args.text_tokens, checkpointing=checkpointing)
                print(
                    f"{model} ({act['params_b']:.2f} B params, {2 * act['params_b'] * 1e9 / GIB:.1f} GiB bf16): "
                    f"{resolution} px + one 1 MP reference, {args.text_tokens} text tokens ({act['tokens']} tokens), "
                    f"checkpointing={checkpointing}: {act['without_attention_probs_gib']:.2f} GiB per row "
                    f"(+ {act['attention_probs_gib']:.2f} GiB attention probabilities on the math path)"
                )


if __name__ == "__main__":
    main()
