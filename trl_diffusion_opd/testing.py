"""Offline, randomly initialised pipelines for tests, examples, the demo and benchmarks.

Everything here is built from configs in memory: no file or network access, deterministic for a seed, and small
enough that a transformer forward pass takes milliseconds on a CPU. The pipelines are real diffusers pipelines
(`StableDiffusion3Pipeline`, `FluxPipeline`, `Flux2KleinPipeline`, `QwenImagePipeline`, `ZImagePipeline`, `WanPipeline`), so the code under test is the
code users run on real checkpoints.

```python
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_to_hub_cache

pipe = get_tiny_sd3_pipeline(seed=0)
image = pipe("a red circle", num_inference_steps=2, height=32, width=32).images[0]

pipe.save_pretrained("tiny-sd3")
save_to_hub_cache("tiny-sd3", "org/tiny-sd3", cache_dir="hub-cache")  # then HF_HUB_OFFLINE=1 from_pretrained works
```

This module is never imported by the training path.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import shutil
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLQwenImage21,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImage21Pipeline,
    QwenImage21Transformer2DModel,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from . import registry


__all__ = [
    "TINY_PIPELINES",
    "TINY_RESOLUTION",
    "get_tiny_clip_tokenizer",
    "get_tiny_flux2_klein_pipeline",
    "get_tiny_flux_kontext_pipeline",
    "get_tiny_flux_pipeline",
    "get_tiny_input_image",
    "get_tiny_qwen2_tokenizer",
    "get_tiny_qwen2vl_processor",
    "get_tiny_qwenimage_edit_pipeline",
    "get_tiny_qwenimage_edit_plus_pipeline",
    "get_tiny_qwen_tokenizer",
    "get_tiny_qwen3_tokenizer",
    "get_tiny_qwenimage21_pipeline",
    "get_tiny_qwenimage_pipeline",
    "get_tiny_sd3_pipeline",
    "get_tiny_t5_tokenizer",
    "get_tiny_wan_i2v_pipeline",
    "get_tiny_wan_pipeline",
    "get_tiny_zimage_pipeline",
    "save_toy_lora",
    "save_to_hub_cache",
]


def _records_its_call(build):
    """Make a tiny-pipeline builder record on its pipeline how it was built, for model cards: the call of a
    registered name (`tiny:sd3` is `get_tiny_sd3_pipeline(seed=0)`) names the pipeline so, as `registry.load_pipeline`
    does; another call is recorded with `registry.record_built_pipeline`."""
    signature = inspect.signature(build)

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        pipeline = build(*args, **kwargs)
        given = signature.bind(*args, **kwargs).arguments
        changed = {k: v for k, v in given.items() if v != signature.parameters[k].default}
        for name, registered in TINY_PIPELINES.items():
            if getattr(registered, "func", registered) is wrapper and changed == getattr(registered, "keywords", {}):
                pipeline.register_to_config(_name_or_path=f"tiny:{name}")
                return pipeline
        call = f"{build.__name__}({', '.join(f'{k}={v!r}' for k, v in given.items())})"
        registry.record_built_pipeline(
            pipeline,
            f"randomly initialised, built by `trl_diffusion_opd.testing.{call}`",
            quickstart=f"from trl_diffusion_opd.testing import {build.__name__}\n\npipe = {call}",
        )
        return pipeline

    return wrapper


# Image side (pixels) the tiny pipelines are meant to run at: 2x VAE downsampling -> 16x16 latents.
TINY_RESOLUTION = 32
_CLIP_MAX_LENGTH = 77
_T5_MAX_LENGTH = 32
_CHARS = string.ascii_lowercase + string.digits + ".,'\"!?-"


def get_tiny_clip_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer built in memory (no vocab file, no download)."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    pieces = specials + list(_CHARS) + [c + "</w>" for c in _CHARS]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LENGTH)


def get_tiny_t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 Unigram tokenizer built in memory (no sentencepiece file, no download)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in _CHARS] + [("▁" + c, -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


# Qwen3's chat template, reduced to what prompt encoding uses: user turns and the generation prompt, whose empty
# thinking block is added only when thinking is disabled (Z-Image enables it, so no block).
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def get_tiny_qwen3_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2/Qwen3 BPE tokenizer built in memory (one token per byte, no merges, no download), with
    Qwen's `<|im_start|>` / `<|im_end|>` special tokens and chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {piece: i for i, piece in enumerate(sorted(ByteLevel.alphabet()) + specials)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=_QWEN3_CHAT_TEMPLATE, model_max_length=512)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in specials[1:]])
    return tokenizer


# Qwen3's chat template, reduced to what text-to-image pipelines use: user/system turns without tools, the generation
# prompt and `enable_thinking=False` (an empty think block). Renders exactly what Qwen3's own template renders there.
_QWEN3_NO_THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def get_tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2/Qwen3 BPE tokenizer built in memory (every byte is a token, no merges, no download), with
    Qwen's chat special tokens and Qwen3's chat template. Pads with `<|endoftext|>` as Qwen does."""
    from tokenizers import pre_tokenizers

    pieces = ["<|endoftext|>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    tokenizer = Qwen2Tokenizer(
        vocab={piece: i for i, piece in enumerate(pieces)},
        merges=[],
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    )
    tokenizer.chat_template = _QWEN3_NO_THINKING_TEMPLATE
    return tokenizer


# The words of Qwen-Image's prompt template, one BPE token each as in the real vocabulary, so that its system prefix
# is the 34 tokens the pipeline drops (`prompt_template_encode_start_idx`). Other text is tokenised byte by byte.
_QWEN_TEMPLATE_WORDS = [
    "system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color", " shape", " size",
    " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background",
]  # fmt: skip


def get_tiny_qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level `Qwen2Tokenizer` (the class of Qwen-Image's tokenizer) built in memory (no download): the 256
    byte symbols, one merged token per word of Qwen-Image's prompt template, and the chat special tokens, so the
    template's prefix is 34 tokens as with the real tokenizer."""
    byte_symbols = bytes_to_unicode()
    vocab = {symbol: i for i, symbol in enumerate(sorted(set(byte_symbols.values())))}
    merges = []
    for word in _QWEN_TEMPLATE_WORDS:
        symbols = [byte_symbols[b] for b in word.encode()]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            vocab.setdefault(merged, len(vocab))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=2048)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials[1:]], special_tokens=True)
    return tokenizer


def _clip_config(hidden_size: int, vocab_size: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        vocab_size=vocab_size,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def _t5_encoder(d_model: int, vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _tiny_vae(latent_channels: int, shift_factor: float = 0.0609, scaling_factor: float = 1.5035) -> AutoencoderKL:
    # Two blocks -> vae_scale_factor 2. Shift/scale default to SD3's so that the code path that undoes them is
    # exercised.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def _seeded(seed: int, offset: int):
    torch.manual_seed(seed * 1000 + offset)


@_records_its_call
def get_tiny_sd3_pipeline(
    seed: int = 0,
    with_t5: bool = True,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    patch_size: int = 2,
    sample_size: int = TINY_RESOLUTION // 2,
    shift: float = 3.0,
) -> StableDiffusion3Pipeline:
    """A randomly initialised `StableDiffusion3Pipeline` with SD3.5's structure at a tiny size.

    Args:
        seed: All weights are a deterministic function of the seed.
        with_t5: Include the T5 text encoder (SD3 also runs without it, padding with zeros). A saved pipeline
            without T5 reloads with `from_pretrained(path, text_encoder_3=None, tokenizer_3=None)`, as diffusers
            requires for SD3.
        num_layers, num_attention_heads, attention_head_dim, patch_size: Transformer size. The defaults are tiny
            (milliseconds per forward pass); benchmarks pass e.g. `num_layers=4, num_attention_heads=4,
            attention_head_dim=64` for a "small" model with hidden size 256.
        sample_size: Latent side the transformer is configured for (the image side is twice this).
        shift: Sigma shift of the flow-matching scheduler (SD3.5-Medium uses 3.0).

    Returns:
        The pipeline in eval mode on the CPU, float32.
    """
    hidden = 32
    clip_vocab = len(get_tiny_clip_tokenizer())
    joint_dim = 2 * hidden  # concatenated CLIP-L + CLIP-G hidden states, the width of T5 too
    _seeded(seed, 1)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_dim,
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=2 * hidden,
        pos_embed_max_size=max(sample_size // patch_size, 16),
    )
    _seeded(seed, 2)
    text_encoder = CLIPTextModelWithProjection(_clip_config(hidden, clip_vocab, hidden))
    _seeded(seed, 3)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(hidden, clip_vocab, hidden))
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = get_tiny_t5_tokenizer()
        _seeded(seed, 4)
        text_encoder_3 = _t5_encoder(joint_dim, len(tokenizer_3))
    _seeded(seed, 5)
    vae = _tiny_vae(latent_channels=4)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=get_tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=get_tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _to_eval(pipe)


@_records_its_call
def get_tiny_flux_pipeline(
    seed: int = 0,
    guidance_embeds: bool = True,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
) -> FluxPipeline:
    """A randomly initialised `FluxPipeline` with FLUX.1's structure at a tiny size.

    Args:
        seed: All weights are a deterministic function of the seed.
        guidance_embeds: `True` mimics the guidance-distilled FLUX.1-dev, `False` FLUX.1-schnell.
        num_layers, num_single_layers, num_attention_heads, attention_head_dim: Transformer size.

    Returns:
        The pipeline in eval mode on the CPU, float32.
    """
    hidden = 32
    latent_channels = 4
    axes = attention_head_dim // 4
    _seeded(seed, 1)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # FLUX packs 2x2 latent patches into channels
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=hidden,
        pooled_projection_dim=hidden,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(axes, axes, attention_head_dim - 2 * axes),
    )
    clip_tokenizer = get_tiny_clip_tokenizer()
    _seeded(seed, 2)
    text_encoder = CLIPTextModel(_clip_config(hidden, len(clip_tokenizer), hidden))
    tokenizer_2 = get_tiny_t5_tokenizer()
    _seeded(seed, 3)
    text_encoder_2 = _t5_encoder(hidden, len(tokenizer_2))
    _seeded(seed, 4)
    vae = _tiny_vae(latent_channels=latent_channels)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=16,
        max_image_seq_len=256,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _to_eval(pipe)


@_records_its_call
def get_tiny_flux_kontext_pipeline(seed: int = 0, **kwargs) -> FluxKontextPipeline:
    """A randomly initialised `FluxKontextPipeline` (FLUX.1 Kontext dev's structure, guidance embedding): the
    components of `get_tiny_flux_pipeline(seed, **kwargs)`, which Kontext shares with FLUX.1."""
    return _to_eval(FluxKontextPipeline(**get_tiny_flux_pipeline(seed, **kwargs).components))


def get_tiny_input_image(seed: int = 0, height: int = TINY_RESOLUTION, width: int = TINY_RESOLUTION):
    """A deterministic RGB PIL image of `height` x `width` pixels (smooth colour gradients plus noise), an input image
    for the tiny editing pipelines."""
    import PIL.Image

    generator = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0, 1, height)[:, None, None]
    cols = torch.linspace(0, 1, width)[None, :, None]
    phase = torch.rand(3, generator=generator)
    base = (rows * phase + cols * (1 - phase) + 0.2 * torch.rand(height, width, 3, generator=generator)) % 1.0
    return PIL.Image.fromarray((base * 255).round().to(torch.uint8).numpy())


@_records_its_call
def get_tiny_zimage_pipeline(
    seed: int = 0,
    n_layers: int = 2,
    n_refiner_layers: int = 1,
    dim: int = 32,
    n_heads: int = 2,
    shift: float = 6.0,
) -> ZImagePipeline:
    """A randomly initialised `ZImagePipeline` with Z-Image's structure at a tiny size (diffusers' own test config:
    Qwen3 text encoder, 16-channel FLUX-style VAE with Z-Image's scale and shift, static-shift Euler scheduler).

    Args:
        seed: All weights are a deterministic function of the seed.
        n_layers, n_refiner_layers, dim, n_heads: Transformer size.
        shift: Static sigma shift of the scheduler (6.0 is the base Z-Image's, 3.0 Z-Image-Turbo's).

    Returns:
        The pipeline in eval mode on the CPU, float32.
    """
    caption_dim = 16
    tokenizer = get_tiny_qwen3_tokenizer()
    _seeded(seed, 1)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=dim,
        n_layers=n_layers,
        n_refiner_layers=n_refiner_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        qk_norm=True,
        cap_feat_dim=caption_dim,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # the pad tokens are created with `torch.empty`: give them seeded values
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    _seeded(seed, 2)
    config = Qwen3Config(
        hidden_size=caption_dim,
        intermediate_size=2 * caption_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = Qwen3Model(config)
    _seeded(seed, 3)
    vae = _tiny_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    return _to_eval(pipe)


@_records_its_call
def get_tiny_flux2_klein_pipeline(
    seed: int = 0,
    is_distilled: bool = False,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
) -> Flux2KleinPipeline:
    """A randomly initialised `Flux2KleinPipeline` with FLUX.2 [klein]'s structure at a tiny size.

    The Qwen3 text encoder has 28 layers of width 16 so that the pipeline's default hidden-state taps (9, 18, 27)
    exist, and the transformer's text width is 3 x 16 = 48, as klein-4B's is 3 x 2560. The VAE has 4 latent channels
    (16 after 2x2 patchification) and random BatchNorm running statistics, so that the denormalisation before
    decoding is exercised.

    Args:
        seed: All weights are a deterministic function of the seed.
        is_distilled: `True` mimics the step-distilled klein checkpoints (the pipeline then ignores CFG).
        num_layers, num_single_layers, num_attention_heads, attention_head_dim: Transformer size.

    Returns:
        The pipeline in eval mode on the CPU, float32.
    """
    text_hidden = 16
    latent_channels = 4
    axes = attention_head_dim // 4
    tokenizer = get_tiny_qwen_tokenizer()
    _seeded(seed, 1)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # the VAE's 2x2 patches, packed into channels
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=3 * text_hidden,
        timestep_guidance_channels=32,
        axes_dims_rope=(axes, axes, axes, attention_head_dim - 3 * axes),
        guidance_embeds=False,
    )
    _seeded(seed, 2)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    _seeded(seed, 3)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.bn.running_mean.copy_(torch.randn(4 * latent_channels) * 0.5)
    vae.bn.running_var.copy_(torch.rand(4 * latent_channels) * 1.5 + 0.5)
    # FLUX.2's published scheduler config (dynamic exponential shift; the pipeline always supplies `mu`).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    return _to_eval(pipe)


@_records_its_call
def get_tiny_qwenimage_pipeline(
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    zero_cond_t: bool = False,
) -> QwenImagePipeline:
    """A randomly initialised `QwenImagePipeline` with Qwen-Image's structure at a tiny size (diffusers' test sizes):
    a Qwen2.5-VL text encoder (2 layers, hidden size 16, a one-block vision tower the pipeline never runs), a
    single-frame 3D VAE with 4x downsampling and non-trivial `latents_mean` / `latents_std`, and the published
    scheduler config (exponential dynamic shift, `shift_terminal=0.02`) with sequence lengths scaled down so that
    32 px images (16 packed tokens) get a shift between the base and maximum ones.

    Args:
        seed: All weights are a deterministic function of the seed.
        num_layers, num_attention_heads, attention_head_dim: Transformer size.
        zero_cond_t: The transformer's `zero_cond_t` (Qwen-Image-Edit-2511; it adds no weights).

    Returns:
        The pipeline in eval mode on the CPU, float32.
    """
    hidden = 16
    latent_channels = 4
    tokenizer = get_tiny_qwen2_tokenizer()
    vocab = len(tokenizer)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    _seeded(seed, 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * latent_channels,  # 2x2 latent patches packed into channels
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=hidden,
        axes_dims_rope=(attention_head_dim // 2, attention_head_dim // 4, attention_head_dim // 4),
        zero_cond_t=zero_cond_t,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": vocab,
            "bos_token_id": pad_id,
            "eos_token_id": pad_id,
            "pad_token_id": pad_id,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 1, "hidden_size": hidden, "intermediate_size": hidden, "num_heads": 2},
        vocab_size=vocab,
        # ids outside the vocabulary: the prompts never contain vision tokens
        image_token_id=vocab,
        video_token_id=vocab + 1,
        vision_start_token_id=vocab + 2,
        vision_end_token_id=vocab + 3,
    )
    config.vision_config.out_hidden_size = hidden
    _seeded(seed, 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    _seeded(seed, 3)
    vae = AutoencoderKLQwenImage(
        base_dim=6 * latent_channels,
        z_dim=latent_channels,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=4,
        max_image_seq_len=64,
        shift_terminal=0.02,
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    return _to_eval(pipe)


# The system prompt of Qwen-Image-Edit's template: each of its pre-tokens is one token of the tiny vocabulary, as in
# the real one, so the template's prefix is the 64 tokens the pipelines drop (`prompt_template_encode_start_idx`).
_QWEN_EDIT_SYSTEM = (
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that meets the "
    "user's requirements while maintaining consistency with the original input where appropriate."
)
_QWEN_VL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]  # fmt: skip


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-token: merge the adjacent pair of lowest rank until none is left."""
    while True:
        pairs = [(ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:])) if pair in ranks]
        if not pairs:
            return pieces
        _, i = min(pairs)
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]


class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without a video processor: transformers cannot check the class of a missing one when
    torchvision is not installed, and Qwen-Image-Edit never passes videos."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def get_tiny_qwen2vl_processor(max_pixels: int = 56 * 56) -> Qwen2VLProcessor:
    """A `Qwen2VLProcessor` (the `processor` of Qwen-Image-Edit) built in memory (no download): Qwen2-VL's image
    processor (14 px patches merged 2x2, images resized to at most `max_pixels`) and a byte-level `Qwen2Tokenizer`
    with one token per pre-token of Qwen-Image-Edit's system prompt and the chat and vision special tokens."""
    byte_symbols = bytes_to_unicode()
    vocab = {symbol: i for i, symbol in enumerate(sorted(set(byte_symbols.values())))}
    splitter = get_tiny_qwen2_tokenizer().backend_tokenizer.pre_tokenizer
    merges: dict[tuple[str, str], int] = {}
    for word, _ in splitter.pre_tokenize_str(_QWEN_EDIT_SYSTEM + "\nuser\nassistant"):
        while len(pieces := _bpe(list(word), merges)) > 1:  # merge until the word is one token
            merges[(pieces[0], pieces[1])] = len(merges)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    for token in _QWEN_VL_SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(merges), model_max_length=4096)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_VL_SPECIALS[1:]], True)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels)
    return _ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def get_tiny_qwenimage_edit_plus_pipeline(
    seed: int = 0, zero_cond_t: bool = True, num_layers: int = 2, attention_head_dim: int = 16
) -> QwenImageEditPlusPipeline:
    """A randomly initialised `QwenImageEditPlusPipeline` (Qwen-Image-Edit-2509 / 2511) at a tiny size: the transformer,
    VAE and scheduler of `get_tiny_qwenimage_pipeline`, a Qwen2.5-VL text encoder whose 2-block vision tower sees the
    input images (`get_tiny_qwen2vl_processor`), and `zero_cond_t` (2511: the references are modulated at t = 0).

    Args:
        seed: All weights are a deterministic function of the seed.
        zero_cond_t: The transformer's `zero_cond_t` (2511: True; 2509: False).
        num_layers, attention_head_dim: Transformer size.

    Returns:
        The pipeline in eval mode on the CPU, float32.
    """
    hidden = 16
    base = get_tiny_qwenimage_pipeline(
        seed, num_layers=num_layers, attention_head_dim=attention_head_dim, zero_cond_t=zero_cond_t
    )
    processor = get_tiny_qwen2vl_processor()
    tokenizer = processor.tokenizer
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end")}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "bos_token_id": pad_id,
            "eos_token_id": pad_id,
            "pad_token_id": pad_id,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 2,
            "hidden_size": hidden,
            "intermediate_size": hidden,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        vocab_size=len(tokenizer),
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    config.vision_config.out_hidden_size = hidden
    _seeded(seed, 4)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    pipe = QwenImageEditPlusPipeline(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=base.transformer,
    )
    return _to_eval(pipe)


def get_tiny_qwenimage_edit_pipeline(seed: int = 0, **kwargs) -> QwenImageEditPipeline:
    """A randomly initialised `QwenImageEditPipeline` (Qwen-Image-Edit, one reference): the components of
    `get_tiny_qwenimage_edit_plus_pipeline(seed, zero_cond_t=False, **kwargs)`, which the two pipelines share."""
    plus = get_tiny_qwenimage_edit_plus_pipeline(seed, **{"zero_cond_t": False, **kwargs})
    return _to_eval(QwenImageEditPipeline(**plus.components))


class _ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without a video processor (as `_ImageOnlyQwen2VLProcessor`): Qwen-Image-2.1 passes none."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


# Qwen3-VL's chat template reduced to what `QwenImage21Pipeline.__init__` renders (a system turn of text parts).
_QWEN3VL_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}{{- part.text }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@_records_its_call
def get_tiny_qwenimage21_pipeline(seed: int = 0, num_layers: int = 2) -> QwenImage21Pipeline:
    """A randomly initialised `QwenImage21Pipeline` (Qwen-Image-2.1: text-to-image and image-conditioned) at
    diffusers' test sizes (`tests/pipelines/qwenimage21`): a 2-block single-stream block-causal transformer
    (`causal_condition`), the RGBA VAE (`z_dim` 8, 16x compression), a Qwen3-VL text encoder whose 2-block vision
    tower sees the condition images (16 px patches merged 2x2: one slot per 2x2 latent tokens), a byte-level
    tokenizer with the chat and vision special tokens, and Qwen-Image's dynamically shifted scheduler (no
    `sample_sigmas`).

    Args:
        seed: All weights are a deterministic function of the seed.
        num_layers: Transformer blocks.

    Returns:
        The pipeline in eval mode on the CPU, float32; run it at multiples of 32 pixels (64 x 96: 4 x 6 tokens) with
        `output_resolution=64` for condition images.
    """
    hidden = 16
    byte_symbols = bytes_to_unicode()
    vocab = {symbol: i for i, symbol in enumerate(sorted(set(byte_symbols.values())))}
    for token in _QWEN_VL_SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=4096)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_VL_SPECIALS[1:]], True)
    image_processor = Qwen2VLImageProcessorPil(
        # the VL copy must keep the condition's size (one slot per 2x2 latent tokens): up to `output_resolution` 2048
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=32 * 32,
        max_pixels=2560 * 2560,
    )
    processor = _ImageOnlyQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_QWEN3VL_TEMPLATE
    )
    pad_id = vocab["<|endoftext|>"]
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "vocab_size": len(tokenizer),
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "mrope_interleaved": True},
            "rope_theta": 1000000.0,
            "pad_token_id": pad_id,
            "bos_token_id": pad_id,
            "eos_token_id": pad_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": hidden,
            "intermediate_size": hidden,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    _seeded(seed, 1)
    transformer = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=8,
        out_channels=8,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=hidden,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    )
    _seeded(seed, 2)
    vae = AutoencoderKLQwenImage21(
        base_dim=4,
        decoder_base_dim=4,
        z_dim=8,
        dim_mult=[1] * 5,
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.0] * 8,
        latents_std=[1.0] * 8,
    )
    _seeded(seed, 3)
    text_encoder = Qwen3VLForConditionalGeneration(config)
    # Qwen-Image's scheduler (exponential dynamic shift from the generated tokens, terminal 0.02), its token range
    # scaled to the tiny sizes as in `get_tiny_qwenimage_pipeline`: the pipeline passes `mu` to it.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=4,
        max_image_seq_len=64,
        shift_terminal=0.02,
    )
    pipe = QwenImage21Pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        processor=processor,
        transformer=transformer,
    )
    return _to_eval(pipe)


# Video side and frames the tiny Wan pipelines are meant to run at: 8x VAE downsampling -> 4x4 latents, 2 latent frames.
TINY_WAN_RESOLUTION = 32
TINY_WAN_FRAMES = 5
# The tiny TI2V-5B-like pipeline (Wan 2.2 VAE, 16x downsampling) at 64 pixels: 4x4 latents as well.
TINY_WAN_TI2V_RESOLUTION = 64


@_records_its_call
def get_tiny_wan_pipeline(
    seed: int = 0,
    two_experts: bool = False,
    boundary_ratio: float = 0.875,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 12,
    flow_shift: float = 3.0,
    ti2v: bool = False,
) -> WanPipeline:
    """A randomly initialised `WanPipeline` with Wan 2.1's structure (or Wan 2.2 A14B's two experts, or Wan 2.2
    TI2V-5B's single transformer with per-token timesteps and the Wan 2.2 VAE) at a tiny size.

    The sizes follow diffusers' own Wan tests (`tests/pipelines/wan/test_wan.py`, `test_wan_22.py`); the text encoder
    is a tiny `UMT5EncoderModel` with the character-level T5 tokenizer of `get_tiny_t5_tokenizer`, and the scheduler
    is the Hub pipelines' `UniPCMultistepScheduler` (flow sigmas, `flow_shift`), which the family replaces by the
    flow-matching Euler step with the same shift.

    Args:
        seed: All weights are a deterministic function of the seed.
        two_experts: Add `transformer_2` (the low-noise expert, its own random weights) and `boundary_ratio`.
        boundary_ratio: Switch point of the experts (Wan 2.2 A14B: 0.875).
        num_layers, num_attention_heads, attention_head_dim: Transformer size.
        flow_shift: Shift of the sigma schedule (Wan's text-to-video configs: 3.0).
        ti2v: Wan 2.2 TI2V-5B's structure: `expand_timesteps=True` (one timestep per latent token) and the Wan 2.2
            VAE (`z_dim` 48, `is_residual`, patch 2, 16x spatial compression; diffusers' `test_wan_22.py` TI2V
            sizes), so 48 latent channels; not with `two_experts`.

    Returns:
        The pipeline in eval mode on the CPU, float32; run it at `TINY_WAN_RESOLUTION` pixels
        (`TINY_WAN_TI2V_RESOLUTION` with `ti2v`) and `TINY_WAN_FRAMES` frames.
    """
    if ti2v and two_experts:
        raise ValueError("Wan 2.2 TI2V-5B has one transformer: `ti2v` and `two_experts` exclude each other.")
    channels = 48 if ti2v else 16
    text_dim = 32
    tokenizer = get_tiny_t5_tokenizer()

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=channels,
            out_channels=channels,
            text_dim=text_dim,
            freq_dim=256,
            ffn_dim=32,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )

    _seeded(seed, 1)
    high = transformer()
    low = None
    if two_experts:
        _seeded(seed, 2)
        low = transformer()
    _seeded(seed, 3)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=8,
            d_ff=2 * text_dim,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    _seeded(seed, 4)
    if ti2v:
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=48,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            scale_factor_spatial=16,
            latents_mean=[0.1 * (i % 5 - 2) for i in range(48)],
            latents_std=[1.0 + 0.02 * i for i in range(48)],
        )
    else:
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=high,
        transformer_2=low,
        boundary_ratio=boundary_ratio if two_experts else None,
        expand_timesteps=ti2v,
    )
    return _to_eval(pipe)


# Non-square size and frames of the tiny image-to-video tests (Wan 2.1 / A14B: 8x VAE -> 4 x 6 latents; TI2V: 16x).
TINY_WAN_I2V_SIZE = (32, 48)
TINY_WAN_TI2V_I2V_SIZE = (64, 96)


@_records_its_call
def get_tiny_wan_i2v_pipeline(
    seed: int = 0,
    two_experts: bool = False,
    ti2v: bool = False,
    boundary_ratio: float = 0.875,
    flow_shift: float = 3.0,
    num_layers: int = 2,
) -> WanImageToVideoPipeline:
    """A randomly initialised `WanImageToVideoPipeline`: Wan 2.1 I2V's structure (36 input channels = latents + mask
    + first-frame condition, CLIP image embeddings from a tiny `CLIPVisionModelWithProjection`), Wan 2.2 I2V A14B's
    (`two_experts`: two 36-channel experts, no image encoder, `boundary_ratio`) or Wan 2.2 TI2V-5B's given a first
    frame (`ti2v`: 48 channels, the Wan 2.2 VAE, `expand_timesteps`).

    The sizes follow diffusers' `tests/pipelines/wan/test_wan_image_to_video.py` and `test_wan_22_image_to_video.py`
    (a CLIP of hidden size 4 on 32x32 crops, here with 4x4 patches); the text encoder, tokenizer, VAE and scheduler
    are `get_tiny_wan_pipeline`'s with the same seed.

    Returns:
        The pipeline in eval mode on the CPU, float32; run it at `TINY_WAN_I2V_SIZE` (`TINY_WAN_TI2V_I2V_SIZE` with
        `ti2v`) and `TINY_WAN_FRAMES` frames.
    """
    base = get_tiny_wan_pipeline(
        seed,
        two_experts=two_experts,
        boundary_ratio=boundary_ratio,
        flow_shift=flow_shift,
        num_layers=num_layers,
        ti2v=ti2v,
    )
    channels = 48 if ti2v else 16
    clip = not (two_experts or ti2v)

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=channels if ti2v else 2 * channels + 4,
            out_channels=channels,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
            image_dim=4 if clip else None,
        )

    _seeded(seed, 11)
    high = transformer()
    _seeded(seed, 12)
    low = transformer() if two_experts else None
    image_encoder = image_processor = None
    if clip:
        _seeded(seed, 13)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=4,
                projection_dim=4,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=4,
            )
        )
        image_processor = CLIPImageProcessor(crop_size=32, size=32)
    pipe = WanImageToVideoPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        scheduler=base.scheduler,
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=high,
        transformer_2=low,
        boundary_ratio=boundary_ratio if two_experts else None,
        expand_timesteps=ti2v,
    )
    return _to_eval(pipe)


def _to_eval(pipe):
    # Models built from a config start in train mode; eval() disables dropout so outputs are deterministic.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_to_hub_cache(
    folder: str | os.PathLike,
    repo_id: str,
    cache_dir: str | os.PathLike,
    revision: str = "main",
    repo_type: str = "model",
) -> Path:
    """Place a saved folder into a Hugging Face Hub cache layout so that it resolves offline by repo id.

    Writes `{cache_dir}/models--{org}--{name}/snapshots/{commit}/...` (a copy of `folder`) and
    `refs/{revision}` pointing at that commit, which is what `huggingface_hub` reads when `HF_HUB_OFFLINE=1`. Point
    `HF_HUB_CACHE` (or a `cache_dir=` argument) at `cache_dir`.

    Args:
        folder: A folder produced by `save_pretrained` / `save_lora_weights` (any files).
        repo_id: The `org/name` id it should resolve as.
        cache_dir: The Hub cache root.
        revision: The branch name recorded in `refs/`.
        repo_type: `"model"` or `"dataset"`.

    Returns:
        The snapshot folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    commit = digest.hexdigest()
    repo_dir = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    return snapshot


def save_toy_lora(
    pipeline,
    folder: str | os.PathLike,
    seed: int = 0,
    rank: int = 4,
    lora_alpha: int | None = None,
    target_modules: list[str] | None = None,
    std: float = 0.1,
    format: str = "diffusers",
    shared_seed: int | None = None,
    specific_scale: float = 0.7,
    expert: str = "transformer",
) -> Path:
    """Save a LoRA with random non-zero A and B for `pipeline`'s transformer: a toy "teacher" that differs from
    the base (a freshly initialised LoRA has B = 0 and equals the base).

    Teachers fine-tuned from one base share part of their update. With `shared_seed`, the LoRA has rank `2 * rank`:
    ΔW = B_shared A_shared + specific_scale · B_own A_own, the shared half drawn from `shared_seed` (identical for
    every teacher given the same shared seed and targets) and the own half from `seed`.

    Args:
        pipeline: The pipeline whose transformer the LoRA adapts (left unchanged).
        folder: Output folder.
        seed: Seed of the weights.
        rank, lora_alpha, target_modules: The adapter's shape (alpha defaults to rank, targets to the attention
            projections `attn.to_q/k/v/out.0`, or every `to_q/k/v/out.0` when there is no `attn` module, as in Wan).
        std: Standard deviation of the A and B entries.
        format: `"diffusers"` (`pytorch_lora_weights.safetensors` with adapter metadata) or `"peft"`
            (`adapter_config.json` + `adapter_model.safetensors`, keys prefixed `base_model.model.`).
        expert: The pipeline component to adapt; another than `transformer` (Wan 2.2's `transformer_2`) is saved
            in diffusers format as `pytorch_lora_weights_<expert>.safetensors`, next to the other experts' files.

    Returns:
        The folder.
    """
    import copy
    import json

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    targets = target_modules or ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
    if target_modules is None and not any(
        name.endswith(".attn.to_q") for name, _ in getattr(pipeline, expert).named_modules()
    ):  # Wan names its attentions attn1 / attn2: every attention projection, by suffix
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
    full_rank = 2 * rank if shared_seed is not None else rank
    alpha = lora_alpha or full_rank
    config = LoraConfig(r=full_rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    transformer = copy.deepcopy(getattr(pipeline, expert))
    for name in list(getattr(transformer, "peft_config", {})):
        transformer.delete_adapters(name)
    inject_adapter_in_model(config, transformer, adapter_name="toy")
    own = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(shared_seed) if shared_seed is not None else None
    state = {}
    for key, value in sorted(get_peft_model_state_dict(transformer, adapter_name="toy").items()):
        if shared is None:
            state[key] = torch.randn(value.shape, generator=own) * std
            continue
        is_b = ".lora_B." in key
        half = (value.shape[0], rank) if is_b else (rank, value.shape[1])
        common = torch.randn(half, generator=shared) * std
        specific = torch.randn(half, generator=own) * std * (specific_scale if is_b else 1.0)
        state[key] = torch.cat([common, specific], dim=1 if is_b else 0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if format == "diffusers":
        from .lora_io import adapter_metadata, expert_weight_name

        type(pipeline).save_lora_weights(
            folder,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=adapter_metadata(config),
            weight_name=expert_weight_name(expert),
        )
    elif format == "peft":
        save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
        from .lora_io import adapter_metadata

        data = adapter_metadata(config)
        (folder / "adapter_config.json").write_text(json.dumps(data, indent=2, default=str))
    else:
        raise ValueError(f"format must be 'diffusers' or 'peft', got {format!r}")
    return folder


# `tiny:<name>` base pipelines, registered through the `trl_diffusion_opd.plugins` entry point (`register`).
TINY_PIPELINES = {
    "sd3": get_tiny_sd3_pipeline,
    "flux": get_tiny_flux_pipeline,
    "flux_kontext": get_tiny_flux_kontext_pipeline,
    "flux2_klein": get_tiny_flux2_klein_pipeline,
    "qwenimage": get_tiny_qwenimage_pipeline,
    "qwenimage_edit": get_tiny_qwenimage_edit_pipeline,
    "qwenimage_edit_plus": get_tiny_qwenimage_edit_plus_pipeline,
    "qwenimage21": get_tiny_qwenimage21_pipeline,
    "zimage": get_tiny_zimage_pipeline,
    "wan": get_tiny_wan_pipeline,
    "wan22": functools.partial(get_tiny_wan_pipeline, two_experts=True),
    "wan22_ti2v": functools.partial(get_tiny_wan_pipeline, ti2v=True),
    "wan_i2v": get_tiny_wan_i2v_pipeline,
    "wan22_i2v": functools.partial(get_tiny_wan_i2v_pipeline, two_experts=True),
    "wan22_ti2v_i2v": functools.partial(get_tiny_wan_i2v_pipeline, ti2v=True),
}


# The LoRA of a `toy:<seed>` teacher (the `train` command's too): teachers that share part of their update
# (`shared_seed`), as teachers RL-tuned from one base do.
TOY_TEACHER_LORA = {"rank": 2, "std": 0.1, "shared_seed": 0, "specific_scale": 0.5}


def toy_teacher(name: str):
    """The registered resolver of the teachers `toy:<seed>`: a function `build(pipeline, folder)` that writes a
    random LoRA for the base `pipeline` into `folder` (`save_toy_lora` with `TOY_TEACHER_LORA`)."""
    seed = name.partition(":")[2]
    if not seed.isdigit():
        raise ValueError(f"'{name}' must be 'toy:<integer seed>'.")
    return functools.partial(_write_toy_teacher, seed=int(seed))


def _write_toy_teacher(pipeline, folder: str | os.PathLike, seed: int) -> Path:
    return save_toy_lora(pipeline, folder, seed=seed, **TOY_TEACHER_LORA)


def register() -> None:
    """Register every tiny pipeline as `tiny:<name>` (`trl_diffusion_opd.registry`), seed 0, and the teachers
    `toy:<seed>` (`toy_teacher`)."""
    registry.register_teacher(
        "toy",
        toy_teacher,
        description="a random LoRA for the base, written by `trl_diffusion_opd.testing.save_toy_lora`",
    )
    for name, build in TINY_PIPELINES.items():
        function = getattr(build, "func", build)  # a `functools.partial` fixes keyword arguments
        arguments = ", ".join(["seed=0", *(f"{k}={v!r}" for k, v in getattr(build, "keywords", {}).items())])
        call = f"{function.__name__}({arguments})"
        quickstart = f"from trl_diffusion_opd.testing import {function.__name__}\n\npipe = {call}"
        description = f"randomly initialised, built by `trl_diffusion_opd.testing.{call}`"
        registry.register_pipeline(
            f"tiny:{name}", functools.partial(build, seed=0), quickstart=quickstart, description=description
        )
