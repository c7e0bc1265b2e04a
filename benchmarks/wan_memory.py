"""Parameters, bf16 weight size and student activations of Wan 2.1 / 2.2 at real size, counted on the meta device.

The configs are the published ones (`scripts/convert_wan_to_diffusers.py::get_transformer_config`; see
`shared/reference/model_configs_families.md` section 4): every variant has `patch_size (1, 2, 2)`, head dim 128,
`text_dim 4096`; Wan 2.2 A14B has two experts of the 14B shape, TI2V-5B 48 latent channels and a 16x VAE. Models are
built on the meta device: shapes only, no memory, so this runs on any CPU in seconds.

Activations are the tensors autograd saves for the backward of one student row (one video latent, one prompt of
512 UMT5 tokens, the pipeline's padding) through one transformer with an r32 float32 LoRA on the family's default
targets, as `benchmarks/flux2_klein_memory.py` counts them: on the meta device attention takes the math path, which
saves the L x L attention probabilities that flash / memory-efficient kernels on a GPU do not keep; they are reported
apart. On Wan 2.2 A14B a row runs one expert (the one of its step), so the per-row figure is that of one 14B expert.

    python -m benchmarks.wan_memory                    # every variant at the example YAMLs' 480 x 832, 49 frames
    python -m benchmarks.wan_memory --resolution 480x832 --num_frames 81
"""

from __future__ import annotations

import argparse

import torch

from trl_diffusion_opd.sizes import Resolution, ResolutionLike, image_size, parse_resolution

from .memory import GIB, add_student_lora, count_parameters, weight_sizes


_COMMON = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "text_dim": 4096,
    "freq_dim": 256,
    "qk_norm": "rms_norm_across_heads",
    "cross_attn_norm": True,
    "eps": 1e-6,
}
# The example YAMLs' size: Wan's native 480 x 832 (height x width), 49 frames.
EXAMPLE_RESOLUTION, EXAMPLE_FRAMES = (480, 832), 49
# name: (transformer config, experts, VAE spatial compression)
VARIANTS = {
    "wan2.1-1.3B": ({"num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960, "in_channels": 16}, 1, 8),
    "wan2.1-14B": ({"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824, "in_channels": 16}, 1, 8),
    "wan2.2-TI2V-5B": ({"num_attention_heads": 24, "num_layers": 30, "ffn_dim": 14336, "in_channels": 48}, 1, 16),
    "wan2.2-A14B": ({"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824, "in_channels": 16}, 2, 8),
}
TEXT_TOKENS = 512  # WanPipeline pads the UMT5 embeddings to max_sequence_length (512 by default)


def _transformer(variant: str, dtype: torch.dtype = torch.bfloat16):
    from diffusers import WanTransformer3DModel

    config = VARIANTS[variant][0]
    with torch.device("meta"):
        return WanTransformer3DModel(**_COMMON, **config, out_channels=config["in_channels"]).to(dtype)


def _text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
    )
    with torch.device("meta"):
        return UMT5EncoderModel(config)


def model_sizes(variant: str) -> dict[str, float]:
    """Parameters (billions) and bf16 weight size (GiB) of the transformer(s) and of the UMT5-XXL encoder."""
    experts = VARIANTS[variant][1]
    transformer, text_encoder = experts * count_parameters(_transformer(variant)), count_parameters(_text_encoder())
    return weight_sizes(transformer, text_encoder)


def saved_activations_per_row(
    variant: str,
    resolution: Resolution | ResolutionLike | None = None,
    num_frames: int | None = None,
    lora_rank: int = 32,
    checkpointing: bool = False,
) -> dict[str, float]:
    """GiB saved for backward by one student row (bf16 base, float32 LoRA r`lora_rank` on the default targets) at
    `resolution` (a side or `(height, width)`; default the example YAMLs' 480 x 832) and `num_frames` (default 49).

    Returns:
        `{"total_gib", "attention_probs_gib", "without_attention_probs_gib", "tokens", "lora_params_m"}` (`tokens`:
        video tokens; `lora_params_m`: the student LoRA's parameters on one transformer, millions).
    """
    from trl_diffusion_opd.families.wan import WanFamily

    config, _, spatial = VARIANTS[variant]
    height, width = (side // spatial for side in image_size(resolution or EXAMPLE_RESOLUTION))
    num_frames = num_frames or EXAMPLE_FRAMES
    dtype = torch.bfloat16
    transformer = _transformer(variant, dtype)
    add_student_lora(transformer, WanFamily.default_lora_targets, lora_rank, checkpointing)
    frames = (num_frames - 1) // 4 + 1
    tokens = frames * (height // 2) * (width // 2)
    totals = {"all": 0, "probs": 0}

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        totals["all"] += size
        if tensor.dim() >= 2 and tensor.shape[-1] in (tokens, TEXT_TOKENS) and tensor.shape[-2] == tokens:
            totals["probs"] += size
        return tensor

    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        transformer(
            hidden_states=torch.randn(1, config["in_channels"], frames, height, width, dtype=dtype),
            timestep=torch.full((1,), 500.0),
            encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, dtype=dtype),
            return_dict=False,
        )
    return {
        "total_gib": totals["all"] / GIB,
        "attention_probs_gib": totals["probs"] / GIB,
        "without_attention_probs_gib": (totals["all"] - totals["probs"]) / GIB,
        "tokens": tokens,
        "lora_params_m": sum(p.numel() for n, p in transformer.named_parameters() if ".student." in n) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--resolution", type=parse_resolution, default=None, help="Default: 480x832 (the YAMLs').")
    parser.add_argument("--num_frames", type=int, default=None, help="Default: the example YAML's (49).")
    args = parser.parse_args()
    for variant in args.variants:
        sizes = model_sizes(variant)
        print(
            f"{variant}: transformer(s) {sizes['transformer_params_b']:.2f} B params, "
            f"{sizes['transformer_bf16_gib']:.1f} GiB bf16; UMT5-XXL {sizes['text_encoder_params_b']:.2f} B, "
            f"{sizes['text_encoder_bf16_gib']:.1f} GiB bf16"
        )
        for checkpointing in (False, True):
            act = saved_activations_per_row(variant, args.resolution, args.num_frames, checkpointing=checkpointing)
            print(
                f"  {act['tokens']} video tokens, checkpointing={checkpointing}: "
                f"{act['without_attention_probs_gib']:.2f} GiB per row "
                f"(+ {act['attention_probs_gib']:.2f} GiB attention probabilities on the math path); "
                f"LoRA r32 {act['lora_params_m']:.1f} M parameters per transformer"
            )


if __name__ == "__main__":
    main()
