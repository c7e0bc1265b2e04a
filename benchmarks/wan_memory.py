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

The image-to-video variants (`WanImageToVideoPipeline`; `shared/reference/image_conditioning.md` section 7) run as the
`wan-i2v` family calls them: Wan 2.1 I2V 14B takes 36 input channels (latents, mask, first-frame latents) and CLIP
ViT-H/14's 257 penultimate tokens of the frame (`image_dim` 1280, `added_kv_proj_dim` 5120: an extra key / value
attention per block), and has the CLIP image encoder beside UMT5; Wan 2.2 I2V A14B two 36-channel experts, no CLIP;
TI2V-5B given a first frame the 5B transformer with one timestep per token (`expand_timesteps`: the first frame's
tokens at t = 0), which makes the time modulation per token. Their YAMLs' 81 frames are their default.

    python -m benchmarks.wan_memory                    # every variant at the example YAMLs' 480 x 832 (49 / 81 frames)
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
# The example YAMLs' size: Wan's native 480 x 832 (height x width), 49 frames (81 for image-to-video).
EXAMPLE_RESOLUTION, EXAMPLE_FRAMES, EXAMPLE_I2V_FRAMES = (480, 832), 49, 81
_I2V_14B = {"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824, "in_channels": 36, "out_channels": 16}
# name: (transformer config, experts, VAE spatial compression)
VARIANTS = {
    "wan2.1-1.3B": ({"num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960, "in_channels": 16}, 1, 8),
    "wan2.1-14B": ({"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824, "in_channels": 16}, 1, 8),
    "wan2.2-TI2V-5B": ({"num_attention_heads": 24, "num_layers": 30, "ffn_dim": 14336, "in_channels": 48}, 1, 16),
    "wan2.2-A14B": ({"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824, "in_channels": 16}, 2, 8),
    "wan2.1-I2V-14B": ({**_I2V_14B, "image_dim": 1280, "added_kv_proj_dim": 5120}, 1, 8),
    "wan2.2-I2V-A14B": (_I2V_14B, 2, 8),
    "wan2.2-TI2V-5B-I2V": ({"num_attention_heads": 24, "num_layers": 30, "ffn_dim": 14336, "in_channels": 48}, 1, 16),
}
# How each image-to-video variant takes its first frame: CLIP tokens + channels, channels, per-token timesteps.
IMAGE_TO_VIDEO = {"wan2.1-I2V-14B": "clip", "wan2.2-I2V-A14B": "channels", "wan2.2-TI2V-5B-I2V": "expand_timesteps"}
CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token
TEXT_TOKENS = 512  # WanPipeline pads the UMT5 embeddings to max_sequence_length (512 by default)


def _transformer(variant: str, dtype: torch.dtype = torch.bfloat16):
    from diffusers import WanTransformer3DModel

    config = VARIANTS[variant][0]
    with torch.device("meta"):
        return WanTransformer3DModel(**_COMMON, **{"out_channels": config["in_channels"], **config}).to(dtype)


def _image_encoder():
    """Wan 2.1 I2V's image encoder: CLIP ViT-H/14 (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s vision tower)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=1024,
        hidden_act="gelu",
    )
    with torch.device("meta"):
        return CLIPVisionModelWithProjection(config)


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
    """Parameters (billions) and bf16 weight size (GiB) of the transformer(s), of the UMT5-XXL encoder and (Wan 2.1
    I2V) of the CLIP image encoder (`image_encoder_params_b`, `image_encoder_bf16_gib`; 0 without one)."""
    experts = VARIANTS[variant][1]
    transformer, text_encoder = experts * count_parameters(_transformer(variant)), count_parameters(_text_encoder())
    image_encoder = count_parameters(_image_encoder()) if IMAGE_TO_VIDEO.get(variant) == "clip" else 0
    return {
        **weight_sizes(transformer, text_encoder),
        "image_encoder_params_b": image_encoder / 1e9,
        "image_encoder_bf16_gib": 2 * image_encoder / GIB,
    }


def saved_activations_per_row(
    variant: str,
    resolution: Resolution | ResolutionLike | None = None,
    num_frames: int | None = None,
    lora_rank: int = 32,
    checkpointing: bool = False,
) -> dict[str, float]:
    """GiB saved for backward by one student row (bf16 base, float32 LoRA r`lora_rank` on the default targets) at
    `resolution` (a side or `(height, width)`; default the example YAMLs' 480 x 832) and `num_frames` (default 49;
    image-to-video: 81), with the first frame's inputs of an image-to-video variant (`IMAGE_TO_VIDEO`).

    Returns:
        `{"total_gib", "attention_probs_gib", "without_attention_probs_gib", "distinct_without_attention_probs_gib",
        "tokens", "lora_params_m"}` (`distinct_...`: each saved buffer counted once, however often it is saved;
        `tokens`: video tokens; `lora_params_m`: the student LoRA's parameters on one transformer, millions).
    """
    from trl_diffusion_opd.families.wan import WanFamily

    config, _, spatial = VARIANTS[variant]
    height, width = (side // spatial for side in image_size(resolution or EXAMPLE_RESOLUTION))
    image = IMAGE_TO_VIDEO.get(variant)
    num_frames = num_frames or (EXAMPLE_I2V_FRAMES if image else EXAMPLE_FRAMES)
    dtype = torch.bfloat16
    transformer = _transformer(variant, dtype)
    add_student_lora(transformer, WanFamily.default_lora_targets, lora_rank, checkpointing)
    frames = (num_frames - 1) // 4 + 1
    tokens = frames * (height // 2) * (width // 2)
    totals = {"all": 0, "probs": 0, "distinct": 0}
    seen = set()

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        totals["all"] += size
        if tensor.dim() >= 2 and tensor.shape[-1] in (tokens, TEXT_TOKENS, CLIP_TOKENS) and tensor.shape[-2] == tokens:
            totals["probs"] += size
        else:
            # one buffer saved by every checkpointed block (TI2V's per-token time modulation) is held once
            storage = tensor.untyped_storage()
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                totals["distinct"] += storage.nbytes()
        return tensor

    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        # TI2V given a first frame: one timestep per video token (the first frame's at 0, as the family passes it)
        timestep = torch.full((1, tokens) if image == "expand_timesteps" else (1,), 500.0)
        extra = (
            {"encoder_hidden_states_image": torch.randn(1, CLIP_TOKENS, 1280, dtype=dtype)} if image == "clip" else {}
        )
        transformer(
            hidden_states=torch.randn(1, config["in_channels"], frames, height, width, dtype=dtype),
            timestep=timestep,
            encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, dtype=dtype),
            return_dict=False,
            **extra,
        )
    return {
        "total_gib": totals["all"] / GIB,
        "attention_probs_gib": totals["probs"] / GIB,
        "without_attention_probs_gib": (totals["all"] - totals["probs"]) / GIB,
        "distinct_without_attention_probs_gib": totals["distinct"] / GIB,
        "tokens": tokens,
        "lora_params_m": sum(p.numel() for n, p in transformer.named_parameters() if ".student." in n) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--resolution", type=parse_resolution, default=None, help="Default: 480x832 (the YAMLs').")
    parser.add_argument("--num_frames", type=int, default=None, help="Default: the example YAMLs' (49; I2V 81).")
    args = parser.parse_args()
    for variant in args.variants:
        sizes = model_sizes(variant)
        print(
            f"{variant}: transformer(s) {sizes['transformer_params_b']:.2f} B params, "
            f"{sizes['transformer_bf16_gib']:.1f} GiB bf16; UMT5-XXL {sizes['text_encoder_params_b']:.2f} B, "
            f"{sizes['text_encoder_bf16_gib']:.1f} GiB bf16"
            + (
                f"; CLIP ViT-H {sizes['image_encoder_params_b']:.2f} B, {sizes['image_encoder_bf16_gib']:.2f} GiB bf16"
                if sizes["image_encoder_params_b"]
                else ""
            )
        )
        for checkpointing in (False, True):
            act = saved_activations_per_row(variant, args.resolution, args.num_frames, checkpointing=checkpointing)
            print(
                f"  {act['tokens']} video tokens, checkpointing={checkpointing}: "
                f"{act['without_attention_probs_gib']:.2f} GiB per row "
                f"({act['distinct_without_attention_probs_gib']:.2f} GiB in distinct buffers) "
                f"(+ {act['attention_probs_gib']:.2f} GiB attention probabilities on the math path); "
                f"LoRA r32 {act['lora_params_m']:.1f} M parameters per transformer"
            )


if __name__ == "__main__":
    main()
