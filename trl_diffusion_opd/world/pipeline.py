"""The world's text-to-image model: a real `StableDiffusion3Pipeline` that works in pixel space.

- VAE: a one-block `AutoencoderKL` whose weights are set by hand so that `encode(x).latent_dist.mode()` and
  `decode(z)` are the identity (max error < 1e-6 in float32): latents are the pixels in [-1, 1], 3 channels,
  `vae_scale_factor` 1, `scaling_factor` 1, `shift_factor` 0. The standard pipeline and `SD3Family.decode` still
  decode through it. (How: each channel travels as the pair (x, -x) next to constants (2048, -2048, 0, ...) in its
  GroupNorm group, so the group's statistics are the constants' (mean 0, std 1024, exact in fp16) up to a 1e-7
  relative error; `silu(a) - silu(-a) = a` undoes the activation; every residual branch is zeroed.)
- Text: two frozen, randomly initialised tiny CLIP encoders with a BPE tokenizer whose merges make every world
  word one token, 16 positions; no T5 (pass `max_sequence_length=1` everywhere: SD3 pads the missing T5 with that
  many zero tokens and the model is trained with one).
- Transformer: an `SD3Transformer2DModel` from `WorldModelConfig` (default patch 2, 6 layers, 4 heads x 32: 3.5M
  parameters, 256 image tokens).

```python
from trl_diffusion_opd.world.pipeline import build_world_pipeline, load_world_pipeline, sample_images

pipe = build_world_pipeline()  # random transformer
pipe = load_world_pipeline()  # the shipped pretrained base (trl_diffusion_opd/world/assets/base)
images = sample_images(pipe, ["a red circle", "the letter K"], num_inference_steps=10)
```
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .. import transition
from ..families.base import get_family
from .scenes import IMAGE_SIZE, vocabulary


BASE_DIR = Path(__file__).parent / "assets" / "base"
WORLD_CONFIG_FILE = "world_config.json"
SCORES_FILE = "world_scores.json"
MAX_SEQUENCE_LENGTH = 1  # T5 zero tokens; the world has no T5
TOKENIZER_MAX_LENGTH = 16  # the longest prompt is 9 tokens with <bos> and <eos>
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'\"!?-"

# GroupNorm constants of the identity VAE (powers of two, exact in fp16).
_VAE_CONST = 2048.0
_VAE_STD = 1024.0  # std of a group [x, -x, c, -c, 0, 0, 0, 0] is c / 2 when |x| << c
_VAE_GROUP = 8


@dataclass
class WorldModelConfig:
    """Size of the world pipeline.

    Args:
        patch_size: Transformer patch side in pixels (2: 256 tokens at 32 x 32; 4: 64 tokens, 4 x 4 blocks).
        num_layers, num_attention_heads, attention_head_dim: Transformer size (hidden = heads x head_dim).
        text_hidden_size: Width of each tiny CLIP encoder (the transformer sees both, concatenated).
        shift: Sigma shift of the flow-matching scheduler (SD3.5 uses 3.0).
        seed: Seed of every random weight.
    """

    patch_size: int = 2
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    text_hidden_size: int = 64
    shift: float = 3.0
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> WorldModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------- tokenizer
def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that turn each of `words` into a single token: learnt greedily on the word list itself, so that
    applying them in rank order (what the tokenizer does) replays the learning and ends at whole words."""
    corpus = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(
            (a, b) for pieces in corpus.values() if len(pieces) > 1 for a, b in zip(pieces, pieces[1:], strict=False)
        )
        if not pairs:
            return merges
        best = max(pairs, key=lambda pair: (pairs[pair], pair))  # deterministic tie-break
        merges.append(best)
        for word, pieces in corpus.items():
            merged, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            corpus[word] = merged


def get_world_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory whose vocabulary holds every world word as one token (plus single
    characters, so that any text still tokenizes)."""
    words = vocabulary()
    merges = _learn_merges(words)
    pieces = ["<|startoftext|>", "<|endoftext|>", *_CHARS, *(c + "</w>" for c in _CHARS)]
    pieces += [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=TOKENIZER_MAX_LENGTH)


# ---------------------------------------------------------------------------------------------- components
def identity_vae() -> AutoencoderKL:
    """The pixel-space `AutoencoderKL`: 3 latent channels, no downsampling, encode and decode are the identity."""
    channels = 3 * _VAE_GROUP
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(channels,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=3,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()  # zero residual branches (each resnet's conv2) make every block the identity
        for coder in (vae.encoder, vae.decoder):
            for c in range(3):
                group = c * _VAE_GROUP
                coder.conv_in.weight[group, c, 1, 1] = 1.0
                coder.conv_in.weight[group + 1, c, 1, 1] = -1.0
                coder.conv_in.bias[group + 2] = _VAE_CONST
                coder.conv_in.bias[group + 3] = -_VAE_CONST
                # GroupNorm divides by the group's std (~_VAE_STD); the output conv multiplies it back, and
                # silu(a) - silu(-a) = a undoes the SiLU exactly.
                coder.conv_out.weight[c, group, 1, 1] = _VAE_STD
                coder.conv_out.weight[c, group + 1, 1, 1] = -_VAE_STD
            coder.conv_norm_out.weight.fill_(1.0)
        vae.encoder.conv_out.bias[3:] = -30.0  # log-variance: std e^-15, so sampling the posterior is the mean too
    return vae


def _clip_encoder(config: WorldModelConfig, vocab_size: int, offset: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(config.seed * 1000 + offset)
    hidden = config.text_hidden_size
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        vocab_size=vocab_size,
        projection_dim=hidden,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    return CLIPTextModelWithProjection(text_config)


def build_world_pipeline(config: WorldModelConfig | None = None) -> StableDiffusion3Pipeline:
    """A world pipeline with a randomly initialised transformer (a deterministic function of `config.seed`).

    Returns:
        The pipeline on the CPU in float32, eval mode, progress bar off; its config is stored in
        `pipeline.world_config`.
    """
    config = config or WorldModelConfig()
    if IMAGE_SIZE % config.patch_size:
        raise ValueError(f"patch_size must divide {IMAGE_SIZE}, got {config.patch_size}")
    tokenizer = get_world_tokenizer()
    text_dim = 2 * config.text_hidden_size  # CLIP-L and CLIP-G hidden states, concatenated
    hidden = config.num_attention_heads * config.attention_head_dim
    torch.manual_seed(config.seed * 1000 + 1)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=config.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=text_dim,
        caption_projection_dim=hidden,
        pooled_projection_dim=text_dim,
        pos_embed_max_size=IMAGE_SIZE // config.patch_size,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift),
        vae=identity_vae(),
        text_encoder=_clip_encoder(config, len(tokenizer), 2),
        tokenizer=tokenizer,
        text_encoder_2=_clip_encoder(config, len(tokenizer), 3),
        tokenizer_2=get_world_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return _finish(pipe, config)


def _finish(pipe: StableDiffusion3Pipeline, config: WorldModelConfig) -> StableDiffusion3Pipeline:
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            component.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    pipe.world_config = config
    return pipe


def save_world_pipeline(
    pipe: StableDiffusion3Pipeline, folder: str | os.PathLike, dtype: torch.dtype = torch.float16
) -> Path:
    """Save the pipeline (weights in `dtype`, fp16 by default: ~7 MB at the default size) and its
    `world_config.json`. The pipeline itself is left in its own dtype."""
    import copy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(pipe).to(dtype=dtype).save_pretrained(folder, safe_serialization=True)
    config = getattr(pipe, "world_config", None) or WorldModelConfig()
    (folder / WORLD_CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return folder


@contextlib.contextmanager
def _no_loading_bars():
    """Without diffusers' and transformers' loading bars: the world's 8 MB load in a fraction of a second, and two
    nested bars per load would crowd the demo's one bar per phase. The libraries' previous settings are restored."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(module, module.is_progress_bar_enabled()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in states:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            if enabled:
                module.enable_progress_bar()


def load_world_pipeline(
    folder: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusion3Pipeline:
    """Load a saved world pipeline (the shipped base `BASE_DIR` when `folder` is `None`), offline.

    Raises:
        FileNotFoundError: there is no saved pipeline in `folder`.
    """
    folder = Path(folder) if folder is not None else BASE_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No world pipeline in {folder} (no model_index.json); make one with `trl-diffusion-opd world pretrain`."
        )
    config_file = folder / WORLD_CONFIG_FILE
    config = WorldModelConfig.from_dict(json.loads(config_file.read_text())) if config_file.is_file() else None
    with _no_loading_bars():
        pipe = StableDiffusion3Pipeline.from_pretrained(
            folder, text_encoder_3=None, tokenizer_3=None, dtype=dtype, local_files_only=True
        )
    pipe = _finish(pipe, config or WorldModelConfig())
    if folder == BASE_DIR:  # the shipped base goes by its registered name (`world:base`), never by its path
        pipe.register_to_config(_name_or_path="world:base")
    return pipe.to(device)


def saved_scores(folder: str | os.PathLike | None = None) -> dict | None:
    """The end-of-pretraining reward scores saved next to a pipeline (`world_scores.json`), or `None`."""
    path = Path(folder if folder is not None else BASE_DIR) / SCORES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The transformer's conditioning of `prompts` (as `SD3Family.encode_prompts` with `max_sequence_length=1`):
    `prompt_embeds` `(B, 16 + 1, 2 * text_hidden_size)` (both CLIPs' 16 token states concatenated along channels,
    then one T5 zero token) and `pooled_prompt_embeds` `(B, 2 * text_hidden_size)`, in the transformer's dtype."""
    return get_family(pipe, max_sequence_length=MAX_SEQUENCE_LENGTH).encode_prompts(list(prompts))


@torch.no_grad()
def sample_images(
    pipe: StableDiffusion3Pipeline,
    prompts: list[str],
    num_inference_steps: int = 10,
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    transformer: torch.nn.Module | None = None,
) -> list:
    """Sample with the package's rollout machinery (`SD3Family.velocity` + `transition.step_mean`, the ODE the
    trainer's `generate` runs); the same as the diffusers pipeline call with `max_sequence_length=1`.

    Args:
        pipe: A world pipeline.
        prompts: The prompts, one image each.
        num_inference_steps: Euler steps (10 is as good as 20 in this world).
        guidance_scale: CFG scale (the negative prompt is "").
        seed: Initial noise of image i is a function of (seed, i // batch_size) only.
        batch_size: Images per transformer call.
        transformer: Another transformer to sample with (e.g. EMA weights), else the pipeline's.

    Returns:
        One 32 x 32 PIL image per prompt.
    """
    family = get_family(pipe, max_sequence_length=MAX_SEQUENCE_LENGTH)
    transformer = transformer or pipe.transformer
    sigmas = family.sigmas(num_inference_steps, IMAGE_SIZE)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        cond = family.encode_prompts(chunk)
        negative = family.encode_prompts([""] * len(chunk)) if guidance_scale > 1 else None
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        x = family.init_latents(len(chunk), IMAGE_SIZE, generator).to(family.device)
        for j in range(num_inference_steps):
            sigma = sigmas[j].expand(len(chunk)).to(family.device)
            v = family.velocity(transformer, x, sigma, cond, guidance_scale, negative)
            x = transition.step_mean(x, v, sigmas[j].item(), sigmas[j + 1].item())
        images += family.decode(x, IMAGE_SIZE)
    return images
