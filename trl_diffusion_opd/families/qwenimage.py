"""Qwen-Image (`QwenImagePipeline`): Qwen-Image and Qwen-Image-2512."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from ..sizes import Resolution, image_size
from .base import Cond, FlowMatchingFamily, cond_cat, register_family


# `QwenImagePipeline.__call__`'s default `max_sequence_length` (the text encoder allows up to 1024).
DEFAULT_MAX_SEQUENCE_LENGTH = 512


@register_family
class QwenImageFamily(FlowMatchingFamily):
    """Qwen-Image: latents `(B, C, H/8, W/8)` of a single-frame 3D VAE, packed by `velocity` into the transformer's
    `(B, h·w/4, 4C)` tokens (`pack_latents`: the pipeline's layout), dynamic (exponential) shift from the image
    sequence length, timestep = sigma (the transformer embeds 1000·sigma itself), output not negated.

    Prompts are encoded by the pipeline's own `encode_prompt` (Qwen2.5-VL, its chat template, the last hidden
    state with the template's 34 prefix tokens dropped). The pipeline pads a batch to its longest prompt; so that
    prompts encoded at different times can be concatenated, `encode_prompts` pads every row to the fixed
    `max_sequence_length` (default 512, the pipeline's) and returns the mask with it. `velocity` trims the padding
    columns that no row of the call uses and passes the mask, which keeps padding out of the attention: a row's
    velocity does not depend on the padding (tested).

    Guidance is the pipeline's `true_cfg_scale`: the conditional and negative predictions are combined as
    `v_n + g (v_c − v_n)` and each token's combined vector is rescaled to the norm of the conditional one. The
    pipeline applies it only when `true_cfg_scale > 1` *and* a negative prompt is passed; the trainer always has a
    negative prompt (`negative_prompt`, `""` by default; Qwen-Image's README uses `" "`), so its `guidance_scale`
    is the pipeline's `true_cfg_scale` with `negative_prompt=args.negative_prompt`, and `guidance_scale=1` is the
    pipeline called without a negative prompt (no CFG). Guidance-distilled transformers (`guidance_embeds`) are
    not supported: diffusers 0.42's Qwen-Image transformer cannot run them.
    """

    pipeline_class = QwenImagePipeline
    name = "qwenimage"
    tag = "qwen-image"
    # The joint-attention projections of both streams and both streams' MLPs of every block.
    default_lora_targets = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ]
    # Transformer config flags this family runs (the editing family: `zero_cond_t`); the others are refused.
    supported_transformer_options: tuple[str, ...] = ()

    def __init__(self, pipeline: QwenImagePipeline, max_sequence_length: int | None = None):
        if max_sequence_length is not None and not 1 <= max_sequence_length <= 1024:
            raise ValueError(f"Qwen-Image's max_sequence_length must be in [1, 1024], got {max_sequence_length}.")
        super().__init__(pipeline, max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH)
        config = pipeline.transformer.config
        options = ("guidance_embeds", "use_additional_t_cond", "zero_cond_t")
        if any(config.get(option) and option not in self.supported_transformer_options for option in options):
            raise ValueError(
                "Only the text-to-image Qwen-Image transformer is supported (guidance_embeds, use_additional_t_cond "
                "and zero_cond_t must be False)."
            )

    def _latent_size(self, resolution: Resolution) -> tuple[int, int]:
        # VAE downsampling, then 2x2 packing: each latent side must be even (as `prepare_latents`).
        height, width = (2 * (side // (self.vae_scale_factor * 2)) for side in image_size(resolution))
        return height, width

    def pack_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Latents `(B, C, h, w)` -> the pipeline's packed `(B, h·w/4, 4C)` (its `latents` and `"latent"` output)."""
        return self.pipeline._pack_latents(x, *x.shape)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """`prompt_embeds` `(B, L, D)` in the transformer's dtype and `prompt_embeds_mask` `(B, L)` int64 (1 for a
        prompt token, 0 for padding), `L = max_sequence_length`; every row's valid tokens come first."""
        length = self.max_sequence_length
        embeds, mask = self.pipeline.encode_prompt(prompt=prompts, device=self.device, max_sequence_length=length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = length - embeds.shape[1]
        return {
            "prompt_embeds": F.pad(embeds, (0, 0, 0, pad)).to(self.dtype),
            "prompt_embeds_mask": F.pad(mask.long(), (0, pad)),
        }

    @staticmethod
    def trim_padding(cond: Cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embeddings and mask without the trailing columns that are padding in every row, the mask `None`
        when no padding is left (what `QwenImagePipeline.encode_prompt` gives for one batch of prompts).

        Returns:
            `(prompt_embeds (B, L', D), prompt_embeds_mask (B, L') or None)`, `L'` the longest prompt's length.
        """
        embeds, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        counts = mask.sum(1)
        shortest, longest = torch.stack([counts.min(), counts.max()]).tolist()  # one host sync
        mask = mask[:, :longest]
        return embeds[:, :longest], (None if shortest == longest else mask)

    def sigmas(self, num_steps: int, resolution: Resolution) -> torch.Tensor:
        scheduler = self.new_scheduler()
        config = scheduler.config
        height, width = self._latent_size(resolution)
        mu = calculate_shift(
            (height // 2) * (width // 2),  # the packed image sequence length
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return scheduler.sigmas.float()

    def init_latents(self, batch_size: int, resolution: Resolution, generator: torch.Generator | None = None):
        height, width = self._latent_size(resolution)
        channels = self.transformer.config.in_channels // 4
        # One latent frame, drawn in the pipeline's `(B, 1, C, h, w)` layout (the same numbers as `(B, C, h, w)`).
        latents = randn_tensor((batch_size, 1, channels, height, width), generator=generator, device=self.device)
        return latents.float().squeeze(1)

    def velocity(self, transformer, x, sigma, cond, guidance_scale=1.0, negative_cond=None):
        dtype = self.dtype
        height, width = x.shape[-2:]

        def call(x, sigma, cond):
            embeds, mask = self.trim_padding(cond)
            return transformer(
                hidden_states=x.to(dtype),
                timestep=sigma.to(dtype),  # the pipeline passes t / 1000 = sigma; the model embeds 1000·sigma
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=[[(1, height // 2, width // 2)]] * x.shape[0],
                return_dict=False,
            )[0]

        # CFG on the tokens: the rescale's norms are per token.
        v = self.true_cfg_velocity(call, self.pack_latents(x), sigma, cond, negative_cond, guidance_scale)
        scale = self.vae_scale_factor
        return self.pipeline._unpack_latents(v, height * scale, width * scale, scale)[:, :, 0]

    @staticmethod
    def true_cfg_velocity(
        call, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, negative_cond: Cond | None, guidance_scale: float
    ) -> torch.Tensor:
        """`QwenImagePipeline`'s true CFG, the two branches batched in one call.

        `v = c · ‖v_c‖ / ‖c‖` with `c = v_n + g (v_c − v_n)`, norms over the last (packed channel) dimension, so
        each token keeps the conditional prediction's norm. Without guidance (`g <= 1` or no negative), `v_c`.

        Returns:
            float32 velocity of `x`'s shape.
        """
        if guidance_scale <= 1.0 or negative_cond is None:
            return call(x, sigma, cond).float()
        v = call(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat([negative_cond, cond])).float()
        v_negative, v_cond = v.chunk(2)
        combined = v_negative + guidance_scale * (v_cond - v_negative)
        return combined * (v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    def pipeline_guidance_kwargs(self, guidance_scale: float, negative_prompt: str) -> dict[str, object]:
        """`true_cfg_scale` with the negative prompt (the pipeline's `guidance_scale` is for guidance-distilled
        models and is ignored here); without guidance, `true_cfg_scale=1.0` (the pipeline's default is 4.0)."""
        if guidance_scale <= 1.0:
            return {"true_cfg_scale": 1.0}
        return {"true_cfg_scale": guidance_scale, "negative_prompt": negative_prompt}

    @torch.no_grad()
    def decode(self, x: torch.Tensor, resolution: Resolution) -> list:
        vae = self.pipeline.vae
        latents = x.unsqueeze(2).to(vae.dtype)  # (B, C, 1, h, w): one frame
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        # `latents / inv_std` rather than `latents * std`: the pipeline's exact arithmetic
        image = vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]  # the single frame
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
