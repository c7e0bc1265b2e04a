"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor

from ..sizes import Resolution, image_size
from .base import Cond, FlowMatchingFamily, register_family


@register_family
class SD3Family(FlowMatchingFamily):
    """SD3/SD3.5: latents `(B, 16, H/8, W/8)`, timestep = 1000·sigma, CFG by batch doubling.

    Without a T5 encoder, SD3 pads the prompt with `max_sequence_length` zero tokens; pass a small
    `max_sequence_length` (e.g. 1) to avoid paying for empty tokens.
    """

    pipeline_class = StableDiffusion3Pipeline
    name = "sd3"
    tag = "sd3.5"
    # The joint-attention projections of every MMDiT block (the paper's and Flow-GRPO's targets).
    default_lora_targets = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        kwargs = {}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            **kwargs,
        )
        return {"prompt_embeds": prompt_embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def sigmas(self, num_steps: int, resolution: Resolution) -> torch.Tensor:
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.float()

    def init_latents(self, batch_size: int, resolution: Resolution, generator: torch.Generator | None = None):
        height, width = (side // self.vae_scale_factor for side in image_size(resolution))
        shape = (batch_size, self.transformer.config.in_channels, height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def velocity(self, transformer, x, sigma, cond, guidance_scale=1.0, negative_cond=None):
        dtype = self.dtype

        def call(x, sigma, cond):
            return transformer(
                hidden_states=x.to(dtype),
                timestep=(sigma * 1000.0).to(dtype),
                encoder_hidden_states=cond["prompt_embeds"],
                pooled_projections=cond["pooled_prompt_embeds"],
                return_dict=False,
            )[0]

        return self.cfg_velocity(call, x, sigma, cond, negative_cond, guidance_scale)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, resolution: Resolution) -> list:
        vae = self.pipeline.vae
        x = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(x, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
