"""FLUX.1 (`FluxPipeline`): dev (guidance-distilled) and schnell."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from .base import Cond, FlowMatchingFamily, register_family


@register_family
class FluxFamily(FlowMatchingFamily):
    """FLUX.1: packed latents `(B, h·w/4, 4C)` with image ids, dynamic shift from the image sequence length,
    timestep = sigma.

    Guidance: a guidance-distilled model (`transformer.config.guidance_embeds`, FLUX.1-dev) receives
    `guidance_scale` through its guidance embedding and needs no CFG batch; a model without it (FLUX.1-schnell)
    uses true CFG with the negative prompt when `guidance_scale > 1`.
    """

    pipeline_class = FluxPipeline
    name = "flux"
    tag = "flux"
    default_lora_targets = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ]

    @property
    def uses_guidance_embedding(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def resolution_multiple(self) -> int:
        # The transformer's patch size is 1, but its latents are packed into 2x2 patches.
        return self.vae_scale_factor * 2

    def _latent_side(self, resolution: int) -> int:
        # VAE downsampling, then 2x2 packing: the latent side must be even.
        return 2 * (resolution // (self.vae_scale_factor * 2))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        kwargs = {}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, **kwargs
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        scheduler = self.new_scheduler()
        side = self._latent_side(resolution)
        config = scheduler.config
        mu = calculate_shift(
            (side // 2) ** 2,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return scheduler.sigmas.float()

    def init_latents(self, batch_size: int, resolution: int, generator: torch.Generator | None = None):
        side = self._latent_side(resolution)
        channels = self.transformer.config.in_channels // 4
        latents = randn_tensor((batch_size, channels, side, side), generator=generator, device=self.device)
        return self.pipeline._pack_latents(latents.float(), batch_size, channels, side, side)

    def velocity(self, transformer, x, sigma, cond, guidance_scale=1.0, negative_cond=None):
        dtype = self.dtype
        side = int(round((x.shape[1]) ** 0.5))
        img_ids = self.pipeline._prepare_latent_image_ids(x.shape[0], side, side, x.device, dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x.device, dtype=dtype)
        embed_guidance = self.uses_guidance_embedding

        def call(x, sigma, cond):
            guidance = torch.full_like(sigma, guidance_scale, dtype=torch.float32) if embed_guidance else None
            return transformer(
                hidden_states=x.to(dtype),
                timestep=sigma.to(dtype),
                guidance=guidance,
                pooled_projections=cond["pooled_prompt_embeds"],
                encoder_hidden_states=cond["prompt_embeds"],
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]

        if embed_guidance:
            return call(x, sigma, cond).float()
        return self.cfg_velocity(call, x, sigma, cond, negative_cond, guidance_scale)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, resolution: int) -> list:
        vae = self.pipeline.vae
        side = self._latent_side(resolution) * self.vae_scale_factor
        latents = self.pipeline._unpack_latents(x, side, side, self.vae_scale_factor)
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
