"""FLUX.2 [klein] (`Flux2KleinPipeline`): the 4B and 9B klein models, base and step-distilled."""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from diffusers.utils.torch_utils import randn_tensor

from ..sizes import Resolution, image_size
from .base import Cond, FlowMatchingFamily, register_family


logger = logging.getLogger(__name__)


@register_family
class Flux2KleinFamily(FlowMatchingFamily):
    """FLUX.2 [klein]: exactly what `Flux2KleinPipeline.__call__` does for text-to-image.

    - Prompts: the Qwen3 text encoder reads the prompt in Qwen3's chat template (one user turn, generation prompt,
      `enable_thinking=False`), padded to `max_sequence_length` tokens (512 unless set), and the hidden states
      after layers 9, 18 and 27 are concatenated per token (3 x 2560 = 7680 channels for klein-4B). Text position
      ids are `(0, 0, 0, l)` per token.
    - Latents: the transformer works in the VAE's 2x2-patchified, BatchNorm-normalised space. The family's latents
      `x` are that space as an image, `(B, 4·C_vae, H/16, W/16)` (the layout `Flux2KleinPipeline(latents=...)`
      takes, 128 channels at real size); `velocity` packs them into `(B, h·w, 128)` tokens with position ids
      `(0, i, j, 0)` and unpacks the output, so the trainer's Gaussian transition acts on the same numbers as the
      pipeline's scheduler.
    - Schedule: sigmas `linspace(1, 1/N, N)` shifted with the empirical `mu(h·w, N)` of `compute_empirical_mu`
      (resolution- and step-count-dependent), through the pipeline's own scheduler config.
    - Timestep: the transformer receives sigma (it multiplies by 1000 itself); its output is the velocity as is.
    - Guidance: the klein base models (`is_distilled=False` in the pipeline config) use plain classifier-free
      guidance `v_u + g (v_c − v_u)` with the empty prompt when `guidance_scale > 1`, no rescale; there is no
      guidance embedding (`guidance=None`).
    - Step-distilled checkpoints (`black-forest-labs/FLUX.2-klein-4B` / `-9B`, `is_distilled=True`) ignore
      `guidance_scale` as their pipeline does (it only logs a warning): one conditional forward pass per step. For
      teachers this means a `guidance_scale` in a teacher spec has no effect on a distilled base — the teacher's
      means are its conditional velocity — and a distilled student is distilled at guidance 1 whatever the config
      says. Distil klein LoRAs on the same base they were trained on (base vs distilled give different velocities).
    - Decoding: the final latents are BatchNorm-denormalised with the VAE's running statistics, un-patchified to
      `(B, C_vae, H/8, W/8)` and decoded.
    - Reference images (`image=`, editing; klein does text-to-image and editing in one model): each of a row's
      images is checked (PIL, side >= 64, aspect <= 8), brought to <= 1 MP, floored to a multiple of 16 and
      center-cropped (no resize), VAE-encoded at the posterior mode, patchified and BatchNorm-normalised
      (`prepare_image_latents`); the references' tokens follow the generated ones with position ids
      `(10·k, i, j, 0)` for the k-th reference, on both CFG branches. The text encoder never sees the images, the
      shift counts the generated tokens only, and every step is a plain Euler step of the generated latents. Rows
      without an image are text-to-image rows. The output size is the config's `resolution`, or with the option
      `size_from_image` the pipeline's default, the first reference's size (rows of other sizes batched apart).

    `Flux2Pipeline` (FLUX.2 [dev], Mistral-3 text encoder, embedded guidance) is not handled by this family.
    """

    pipeline_class = Flux2KleinPipeline
    name = "flux2_klein"
    tag = "flux2-klein"
    # The attention and MLP linears of the double-stream blocks (image and text streams), and both linears of the
    # single-stream blocks: the fused QKV + MLP-in projection and the fused attention + MLP output projection
    # `single_transformer_blocks.N.attn.to_out`, the only linear that writes a single block's output to the residual
    # stream (diffusers' `train_dreambooth_lora_flux2_klein.py` adapts both). The latter is named per block: its
    # suffix `attn.to_out` would also match the double blocks' `attn.to_out` ModuleList, which PEFT rejects; names of
    # blocks a model lacks match nothing (48 covers FLUX.2 [dev]; klein-4B has 20 single blocks, klein-9B 24).
    default_lora_targets = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_qkv_mlp_proj",
        "attn.to_v",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(48)),
    ]
    # The pipeline's default (`text_encoder_out_layers`); BFL's klein checkpoints were trained with these taps.
    text_encoder_out_layers = (9, 18, 27)
    # The pipeline sets no limit; every reference lengthens every student and teacher pass by its tokens.
    max_input_images = 8

    def __init__(self, pipeline, max_sequence_length: int | None = None, size_from_image: bool = False):
        super().__init__(pipeline, max_sequence_length)
        if not isinstance(size_from_image, bool):
            raise ValueError(
                f"`size_from_image` of the {self.name} family must be true or false, got {size_from_image!r}."
            )
        self.size_from_image = size_from_image
        self.is_distilled = bool(pipeline.config.get("is_distilled", False))
        self._warned_distilled = False

    def batch_key(self, cond: Cond) -> tuple:
        """The shapes and the references' position ids (references of other sizes can make as many tokens)."""
        ids = cond.get("image_ids")
        return (*super().batch_key(cond), None if ids is None else ids.cpu().numpy().tobytes())

    def output_resolution(self, cond: Cond) -> tuple[int, int] | None:
        """With `size_from_image` (the pipeline's default without `height` / `width`), the first reference's size."""
        if not self.size_from_image or "image_ids" not in cond:
            return None
        ids = cond["image_ids"][0]
        first = ids[ids[:, 0] == ids[0, 0]]  # the first reference's tokens (time id 10)
        rows, cols = (int(first[:, axis].max()) + 1 for axis in (1, 2))
        return rows * self.vae_scale_factor * 2, cols * self.vae_scale_factor * 2

    def _latent_size(self, resolution: Resolution) -> tuple[int, int]:
        # Pixels -> VAE latents (x vae_scale_factor) -> 2x2 patches, as `prepare_latents` rounds it.
        height, width = (side // (self.vae_scale_factor * 2) for side in image_size(resolution))
        return height, width

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: list | None = None) -> Cond:
        """`prompt_embeds` `(B, L, 3·D)`; for rows with references also `image_latents` `(B, N_ref, 4·C_vae)` and
        their position ids `image_ids` `(B, N_ref, 4)`. Every row of one call has references of the same sizes, or
        none has references."""
        kwargs = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length is not None else {}
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            text_encoder_out_layers=self.text_encoder_out_layers,
            **kwargs,
        )
        cond = {"prompt_embeds": prompt_embeds.to(self.dtype)}
        if images is None or all(image is None for image in images):
            return cond
        if any(not image for image in images):
            raise ValueError("encode_prompts: every row of one call needs reference images, or none does.")
        latents, ids = zip(*(self._encode_references(row) for row in images))
        if len({tuple(t.shape) for t in latents}) > 1:
            raise ValueError("encode_prompts: the rows of one call need reference images of the same sizes.")
        return {**cond, "image_latents": torch.cat(latents), "image_ids": torch.cat(ids)}

    def _encode_references(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        # `Flux2KleinPipeline.__call__`'s step 4, then `prepare_image_latents`.
        self.check_input_images(len(images), "A row")
        pipe, processor = self.pipeline, self.pipeline.image_processor
        multiple = self.vae_scale_factor * 2
        pixels = []
        for image in images:
            processor.check_image_input(image)
            if image.width * image.height > 1024 * 1024:
                image = processor._resize_to_target_area(image, 1024 * 1024)
            height, width = image.height // multiple * multiple, image.width // multiple * multiple
            pixels.append(processor.preprocess(image, height=height, width=width, resize_mode="crop"))
        vae = pipe.vae
        home = vae.device
        vae.to(self.device)  # the VAE visits the accelerator for the encoding (training never needs it)
        try:
            latents, ids = pipe.prepare_image_latents(pixels, 1, None, self.device, vae.dtype)
        finally:
            vae.to(home)
        return latents.to(self.dtype), ids

    def sigmas(self, num_steps: int, resolution: Resolution) -> torch.Tensor:
        scheduler = self.new_scheduler()
        height, width = self._latent_size(resolution)
        mu = compute_empirical_mu(image_seq_len=height * width, num_steps=num_steps)
        if scheduler.config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", mu=mu)
        return scheduler.sigmas.float()

    def init_latents(self, batch_size: int, resolution: Resolution, generator: torch.Generator | None = None):
        shape = (batch_size, self.transformer.config.in_channels, *self._latent_size(resolution))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def velocity(self, transformer, x, sigma, cond, guidance_scale=1.0, negative_cond=None):
        """Velocity of `x` `(B, 4·C_vae, h, w)` at sigmas `(B,)`; CFG as the pipeline (off for distilled models)."""
        dtype = self.dtype
        batch, channels, height, width = x.shape
        img_ids = self.pipeline._prepare_latent_ids(x[:1]).to(x.device)
        txt_ids = self.pipeline._prepare_text_ids(cond["prompt_embeds"][:1]).to(x.device)
        references = cond.get("image_latents")
        if references is not None:  # the references' tokens follow the generated ones, on both CFG branches
            img_ids = torch.cat([img_ids, cond["image_ids"][:1].to(img_ids)], dim=1)

        def call(x, sigma, cond):
            tokens = self.pipeline._pack_latents(x)  # (B, h*w, 4C)
            if references is not None:  # the CFG batch is [negative rows, rows]: the references repeat block-wise
                tokens = torch.cat([tokens, references.repeat(x.shape[0] // references.shape[0], 1, 1)], dim=1)
            out = transformer(
                hidden_states=tokens.to(dtype),
                timestep=sigma.to(dtype),
                guidance=None,
                encoder_hidden_states=cond["prompt_embeds"],
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0][:, : height * width]
            return out.permute(0, 2, 1).reshape(x.shape[0], channels, height, width)

        if self.is_distilled:
            if guidance_scale > 1 and not self._warned_distilled:
                logger.warning(
                    "guidance_scale %s is ignored: this FLUX.2 [klein] model is step-distilled.", guidance_scale
                )
                self._warned_distilled = True
            return call(x, sigma, cond).float()
        return self.cfg_velocity(call, x, sigma, cond, negative_cond, guidance_scale)

    def vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents `(B, 4·C_vae, h, w)` -> the VAE's latents `(B, C_vae, 2h, 2w)`, as the pipeline returns them
        with `output_type="latent"`: BatchNorm-denormalised with the VAE's running statistics, then un-patchified."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
        return self.pipeline._unpatchify_latents(x * std + mean)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, resolution: Resolution) -> list:
        vae = self.pipeline.vae
        image = vae.decode(self.vae_latents(x).to(vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
