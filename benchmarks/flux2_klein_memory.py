"""Parameters, bf16 weight size and student activations of FLUX.2 [klein] at real size, counted on the meta device.

The configs are the published ones (`scripts/convert_flux2_to_diffusers.py::get_flux2_transformer_config` for the
transformers, Qwen3-4B / Qwen3-8B for the text encoders; see `shared/reference/model_configs_families.md` section 2).
Models are built on the meta device: shapes only, no memory, so this runs on any CPU in seconds.

Activations are the tensors autograd saves for the backward of one student row (one latent, one prompt) through the
transformer with an r32 float32 LoRA on the family's default targets, as `benchmarks/memory.py` counts them for SD3:
on the meta device attention takes the math path, which saves the L x L attention probabilities that flash /
memory-efficient kernels on a GPU do not keep; they are reported apart.

    python -m benchmarks.flux2_klein_memory            # both variants, 512 and 1024 px, 128 and 512 text tokens
"""

from __future__ import annotations

import argparse

import torch

from .memory import GIB, add_student_lora, count_parameters, weight_sizes


# Flux2Transformer2DModel configs of the klein variants (base and step-distilled share them).
TRANSFORMER_CONFIGS = {
    "klein-4B": {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680},
    "klein-9B": {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 12288},
}
_COMMON = {
    "patch_size": 1,
    "in_channels": 128,
    "attention_head_dim": 128,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}
# Qwen3 text encoders (Qwen3ForCausalLM): klein-4B uses Qwen3-4B (tied embeddings), klein-9B a Qwen3-8B shape.
TEXT_ENCODER_CONFIGS = {
    "klein-4B": {"hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True},
    "klein-9B": {"hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False},
}
_TEXT_COMMON = {
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
}


def _transformer(variant: str, dtype: torch.dtype = torch.bfloat16):
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        return Flux2Transformer2DModel(**_COMMON, **TRANSFORMER_CONFIGS[variant]).to(dtype)


def _text_encoder(variant: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        return Qwen3ForCausalLM(Qwen3Config(**_TEXT_COMMON, **TEXT_ENCODER_CONFIGS[variant]))


def model_sizes(variant: str = "klein-4B") -> dict[str, float]:
    """Parameters (billions) and bf16 weight size (GiB) of the transformer and the text encoder of `variant`."""
    transformer, text_encoder = count_parameters(_transformer(variant)), count_parameters(_text_encoder(variant))
    return weight_sizes(transformer, text_encoder)


def saved_activations_per_row(
    variant: str = "klein-4B",
    resolution: int = 512,
    text_tokens: int = 512,
    lora_rank: int = 32,
    checkpointing: bool = False,
) -> dict[str, float]:
    """GiB saved for backward by one student row (bf16 base, float32 LoRA r`lora_rank` on the default targets).

    Returns:
        `{"total_gib", "attention_probs_gib", "without_attention_probs_gib", "tokens"}`.
    """
    from trl_diffusion_opd.families.flux2 import Flux2KleinFamily

    dtype = torch.bfloat16
    transformer = _transformer(variant, dtype)
    add_student_lora(transformer, Flux2KleinFamily.default_lora_targets, lora_rank, checkpointing)
    side = resolution // 16  # VAE x8, then 2x2 patches
    image_tokens = side * side
    tokens = image_tokens + text_tokens
    totals = {"all": 0, "probs": 0}

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        totals["all"] += size
        if tensor.dim() >= 2 and tensor.shape[-1] == tokens and tensor.shape[-2] == tokens:
            totals["probs"] += size
        return tensor

    ids = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_tokens))
    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        transformer(
            hidden_states=torch.randn(1, image_tokens, 128, dtype=dtype),
            timestep=torch.full((1,), 0.5, dtype=dtype),
            guidance=None,
            encoder_hidden_states=torch.randn(
                1, text_tokens, TRANSFORMER_CONFIGS[variant]["joint_attention_dim"], dtype=dtype
            ),
            txt_ids=txt_ids.to("meta"),
            img_ids=ids.to("meta"),
            return_dict=False,
        )
    return {
        "total_gib": totals["all"] / GIB,
        "attention_probs_gib": totals["probs"] / GIB,
        "without_attention_probs_gib": (totals["all"] - totals["probs"]) / GIB,
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(TRANSFORMER_CONFIGS))
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--text_tokens", nargs="+", type=int, default=[128, 512])
    args = parser.parse_args()
    for variant in args.variants:
        sizes = model_sizes(variant)
        print(
            f"{variant}: transformer {sizes['transformer_params_b']:.3f} B params, "
            f"{sizes['transformer_bf16_gib']:.2f} GiB bf16; text encoder {sizes['text_encoder_params_b']:.3f} B, "
            f"{sizes['text_encoder_bf16_gib']:.2f} GiB bf16"
        )
        for resolution in args.resolutions:
            for text in args.text_tokens:
                for checkpointing in (False, True):
                    act = saved_activations_per_row(variant, resolution, text, checkpointing=checkpointing)
                    print(
                        f"  {resolution} px, {text} text tokens ({act['tokens']} tokens), checkpointing="
                        f"{checkpointing}: {act['without_attention_probs_gib']:.2f} GiB per row "
                        f"(+ {act['attention_probs_gib']:.2f} GiB attention probabilities on the math path)"
                    )


if __name__ == "__main__":
    main()
