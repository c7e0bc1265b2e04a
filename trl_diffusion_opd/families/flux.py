"""FLUX.1 (`FluxPipeline`): dev (guidance-distilled) and schnell."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from ..sizes import Resolution, image_size
from .base import Cond, FlowMatchingFamily, register_family


@register_family
class FluxFamily(FlowMatchingFamily):
    """FLUX.1: latents `(B, C, H/8, W/8)`, packed by `velocity` into the transformer's `(B, h·w/4, 4C)` tokens with
    their image ids (so that the latents' shape carries the image's height and width), dynamic shift from the image
    sequence length, timestep = sigma. `pack_latents` gives the layout of the pipeline's `latents`.

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

    def _latent_size(self, resolution: Resolution) -> tuple[int, int]:
        # VAE downsampling, then 2x2 packing: each latent side must be even (as `prepare_latents`).
        height, width = (2 * (side // (self.vae_scale_factor * 2)) for side in image_size(resolution))
        return height, width

    def pack_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Latents `(B, C, h, w)` -> the pipeline's packed `(B, h·w/4, 4C)` (its `latents` and `"latent"` output)."""
        return self.pipeline._pack_latents(x, *x.shape)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        kwargs = {}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, **kwargs
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def sigmas(self, num_steps: int, resolution: Resolution) -> torch.Tensor:
        scheduler = self.new_scheduler()
        height, width = self._latent_size(resolution)
        config = scheduler.config
        mu = calculate_shift(
            (height // 2) * (width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return scheduler.sigmas.float()

    def init_latents(self, batch_size: int, resolution: Resolution, generator: torch.Generator | None = None):
        shape = (batch_size, self.transformer.config.in_channels // 4, *self._latent_size(resolution))
        return randn_tensor(shape, generator=generator, device=self.device).float()

    def velocity(self, transformer, x, sigma, cond, guidance_scale=1.0, negative_cond=None):
        dtype = self.dtype
        height, width = x.shape[-2:]
        img_ids = self.pipeline._prepare_latent_image_ids(x.shape[0], height // 2, width // 2, x.device, dtype)
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

        tokens = self.pack_latents(x)
        count = tokens.shape[1]
        if "image_latents" in cond:  # FLUX.1 Kontext: the references' tokens follow, on both CFG branches
            tokens = torch.cat([tokens, cond["image_latents"].to(tokens.dtype)], dim=1)
            img_ids = torch.cat([img_ids, cond["image_ids"][0].to(dtype)])
        if embed_guidance:
            v = call(tokens, sigma, cond).float()
        else:
            v = self.cfg_velocity(call, tokens, sigma, cond, negative_cond, guidance_scale)
        v = v[:, :count]
        scale = self.vae_scale_factor
        return self.pipeline._unpack_latents(v, height * scale, width * scale, scale)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, resolution: Resolution) -> list:
        vae = self.pipeline.vae
        latents = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
