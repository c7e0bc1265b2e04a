"""Qwen-Image-2.1 (`QwenImage21Pipeline`): text-to-image and image-conditioned generation (editing) in one model."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import QwenImage21Pipeline
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions, calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from ..sizes import Resolution, image_size
from .base import Cond, FlowMatchingFamily, register_family, split_negative


# Text tokens a row's prompt may take (the pipeline does not truncate); a row's image slots come on top.
DEFAULT_MAX_SEQUENCE_LENGTH = 512
_TEXT_KEYS = ("prompt_embeds", "prompt_embeds_mask", "image_pad_mask")


@register_family
class QwenImage21Family(FlowMatchingFamily):
    """Qwen-Image-2.1: exactly what `QwenImage21Pipeline.__call__` does, with or without condition images.

    - Prompts: Qwen3-VL reads the pipeline's raw template (its system turn dropped), through the pipeline's own
      `encode_prompt`, one prompt per call: the transformer's RoPE advances on every text position, padding included,
      so a prompt encoded in a padded batch would give other velocities than the pipeline called with it alone. Each
      row is stored right-padded to `max_sequence_length` text tokens plus its image slots, with its mask and the
      `image_pad_mask` of the VL sequence (where the images' slots are).
    - Condition images (a row's `image`, 1 to `max_input_images`): each is converted to RGBA and resized once to
      `output_resolution`² pixels of area at its own aspect (multiples of 32); the VL model sees that copy (composited
      on white by the pipeline), the VAE encodes it at the posterior mode, normalised with `latents_mean` /
      `latents_std` and flattened to `(h·w, C)` tokens, which come *before* the generated ones (`img_shapes`:
      conditions first, target last). The negative prompt is encoded with the same images (`encode_negative`).
    - Latents: the VAE's `(B, C, H/16, W/16)` (sides floored to multiples of 32); `velocity` flattens them to tokens
      and keeps the last `h·w` outputs. Schedule: the pipeline's `sample_sigmas` when its config has them (they fix
      the step count), else `linspace(1, 1/N, N)`, shifted with `mu` of the generated tokens only. Timestep `t/1000`.
    - Guidance: plain true CFG `v_n + g (v_c − v_n)`, no norm rescale, when `guidance_scale > 1` (the pipeline's
      `true_cfg_scale` with the trainer's `negative_prompt`; the default 1.0 is no CFG). Every step is a plain Euler
      step of the generated latents.
    - KV cache (`use_kv_cache`): with `causal_condition` the text and condition tokens are modulated at t = 0 and
      attend causally, so their keys and values do not depend on the step; the pipeline computes them once per image.
      `velocity` never caches them: every pass (rollout, student, teacher) recomputes them with its own adapter
      active, so the student's condition K/V carry its gradient and teachers see their own. The result is the
      pipeline's with `use_kv_cache=False`, and with the cache to float32 rounding (tested).
    - Batching: the transformer takes one token layout per call, so `velocity` runs rows of equal prompt length and
      image layout together and the others in further calls (CFG's negative rows included).

    The output size is the config's `resolution`, or with `size_from_image` the pipeline's default, `output_resolution`²
    of area at the last image's aspect (its condition's size); rows of other sizes are batched apart.

    Args:
        output_resolution: The pipeline's `output_resolution`: side whose square is the area condition images are
            resized to (and the default output area).
        size_from_image: Each image row's output size from its last image, as the pipeline without `height`/`width`.
    """

    pipeline_class = QwenImage21Pipeline
    name = "qwenimage21"
    tag = "qwen-image-2.1"
    # The attention and SwiGLU linears of every single-stream block (diffusers' tensor-parallel plan lists the same).
    default_lora_targets = [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "img_mlp.proj",
        "img_mlp.gate_layer",
        "img_mlp.out",
    ]
    # The pipeline sets no limit; each 1 MP image adds 4096 tokens to every student and teacher pass.
    max_input_images = 3

    def __init__(
        self,
        pipeline: QwenImage21Pipeline,
        max_sequence_length: int | None = None,
        output_resolution: int = 1024,
        size_from_image: bool = False,
    ):
        super().__init__(pipeline, max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH)
        side = output_resolution
        if isinstance(side, bool) or not isinstance(side, int) or side < 32:
            raise ValueError(f"`output_resolution` of the {self.name} family must be a side >= 32, got {side!r}.")
        if not isinstance(size_from_image, bool):
            raise ValueError(
                f"`size_from_image` of the {self.name} family must be true or false, got {size_from_image!r}."
            )
        self.condition_side = side  # not `output_resolution`: the base's hook of that name
        self.size_from_image = size_from_image

    @property
    def resolution_multiple(self) -> int:
        """32: the pipeline floors both sides to `2 · vae_scale_factor` (its 2x2 image slots)."""
        return 2 * self.vae_scale_factor

    def _latent_size(self, resolution: Resolution) -> tuple[int, int]:
        height, width = (2 * (side // (2 * self.vae_scale_factor)) for side in image_size(resolution))
        return height, width

    def _condition_size(self, image) -> tuple[int, int]:
        width, height, _ = calculate_dimensions(self.condition_side**2, image.width / image.height)
        return int(height), int(width)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: list | None = None) -> Cond:
        """`prompt_embeds` `(B, L, D)`, `prompt_embeds_mask` and `image_pad_mask` `(B, L)` (int64), `L` the text
        limit plus the rows' image slots; for image rows also `condition_latents` `(B, N_cond, C)` and
        `condition_shapes` `(B, K, 2)` (each image's latent grid). Rows of one call have images of the same sizes,
        or none has any."""
        if images is not None and any(images) and not all(images):
            raise ValueError("encode_prompts: every row of one call needs condition images, or none does.")
        images = images if images is not None and any(images) else [None] * len(prompts)
        rows = []
        for prompt, row in zip(prompts, images):
            shown = None if row is None else self._shown(row)
            encoded = self._encode_text(prompt, shown)
            rows.append(encoded if row is None else {**encoded, **self._encode_conditions(shown)})
        if len({tuple((k, tuple(v.shape)) for k, v in row.items()) for row in rows}) > 1:
            raise ValueError("encode_prompts: the rows of one call need condition images of the same sizes.")
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    @torch.no_grad()
    def encode_negative(self, negative_prompt: str, images: list) -> Cond:
        """The negative prompt encoded with each row's images, as the pipeline's negative branch sees it."""
        rows = [self._encode_text(negative_prompt, self._shown(row)) for row in images]
        return {key: torch.cat([row[key] for row in rows]) for key in _TEXT_KEYS}

    def _shown(self, images: list) -> list:
        """`__call__`'s step 1: each image in RGBA, resized to `output_resolution`² of area at its aspect."""
        self.check_input_images(len(images), "A row")
        resize = self.pipeline.image_processor.resize
        return [resize(image.convert("RGBA"), *self._condition_size(image)) for image in images]

    def _encode_text(self, prompt: str, shown: list | None) -> Cond:
        embeds, mask, pad = self.pipeline.encode_prompt(prompt=[prompt], image=shown, device=self.device)
        slots = int(pad.sum())
        length = self.max_sequence_length + slots
        if embeds.shape[1] > length:
            raise ValueError(
                f"The prompt {prompt!r} is {embeds.shape[1] - slots} tokens long, more than "
                f"max_sequence_length={self.max_sequence_length}; raise it."
            )
        if mask is None:  # one prompt: the pipeline drops its all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad_to = length - embeds.shape[1]
        return {
            "prompt_embeds": F.pad(embeds, (0, 0, 0, pad_to)).to(self.dtype),
            "prompt_embeds_mask": F.pad(mask.long(), (0, pad_to)),
            "image_pad_mask": F.pad(pad.long(), (0, pad_to)),
        }

    def _encode_conditions(self, shown: list) -> Cond:
        pipe, vae = self.pipeline, self.pipeline.vae
        home = vae.device
        vae.to(self.device)  # the VAE visits the accelerator for the encoding (training never needs it)
        try:
            tokens, shapes = [], []
            for image in shown:
                pixels = pipe.image_processor.preprocess(image, width=image.width, height=image.height).unsqueeze(2)
                latents = pipe._encode_vae_image(pixels.to(self.device, vae.dtype), None)[:, :, 0]  # (1, C, h, w)
                tokens.append(latents.flatten(2).transpose(1, 2))
                shapes.append(latents.shape[-2:])
        finally:
            vae.to(home)
        return {
            "condition_latents": torch.cat(tokens, dim=1).to(self.dtype),
            "condition_shapes": torch.tensor([shapes], dtype=torch.long, device=self.device),
        }

    def batch_key(self, cond: Cond) -> tuple:
        """The shapes and the conditions' grids (images of other sizes can make as many tokens)."""
        shapes = cond.get("condition_shapes")
        return (*super().batch_key(cond), None if shapes is None else tuple(shapes.flatten().tolist()))

    def output_resolution(self, cond: Cond) -> tuple[int, int] | None:
        """With `size_from_image`, the last image's condition size (the pipeline's default output size)."""
        shapes = cond.get("condition_shapes")
        if not self.size_from_image or shapes is None:
            return None
        height, width = shapes[0, -1].tolist()
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def sigmas(self, num_steps: int, resolution: Resolution) -> torch.Tensor:
        scheduler = self.new_scheduler()
        config = scheduler.config
        sample = self.pipeline.config.get("sample_sigmas")
        if sample is not None and len(sample) != num_steps:
            raise ValueError(
                f"This Qwen-Image-2.1 pipeline samples with its {len(sample)} `sample_sigmas`; set "
                f"num_inference_steps={len(sample)} (got {num_steps})."
            )
        height, width = self._latent_size(resolution)
        mu = calculate_shift(
            height * width,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = sample if sample is not None else np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu, device="cpu")
        return scheduler.sigmas.float()

    def init_latents(self, batch_size: int, resolution: Resolution, generator: torch.Generator | None = None):
        height, width = self._latent_size(resolution)
        channels = self.transformer.config.in_channels
        # Drawn in the pipeline's `(B, 1, C, h, w)` layout: the same numbers as `(B, C, h, w)`.
        latents = randn_tensor((batch_size, 1, channels, height, width), generator=generator, device=self.device)
        return latents.float().squeeze(1)

    def velocity(self, transformer, x, sigma, cond, guidance_scale=1.0, negative_cond=None):
        """Velocity of `x` `(B, C, h, w)` at sigmas `(B,)`; the row's own negative (with its images) when it has one."""
        cond, own_negative = split_negative(cond)
        if negative_cond is not None and own_negative is not None:
            negative_cond = own_negative
        guided = guidance_scale > 1.0 and negative_cond is not None
        text = {k: cond[k] for k in _TEXT_KEYS}
        if guided:  # the negative rows go first, sharing each row's latents and condition tokens
            text = {k: torch.cat([negative_cond[k].to(text[k].device), text[k]]) for k in _TEXT_KEYS}
        repeat = 2 if guided else 1
        conditions = cond.get("condition_latents")
        v = self._predict(
            transformer,
            x.repeat(repeat, 1, 1, 1),
            sigma.repeat(repeat),
            text,
            None if conditions is None else conditions.repeat(repeat, 1, 1),
            None if conditions is None else cond["condition_shapes"][0].tolist(),
        )
        if not guided:
            return v
        v_negative, v_cond = v.chunk(2)
        return v_negative + guidance_scale * (v_cond - v_negative)

    def _predict(self, transformer, x, sigma, text, conditions, condition_shapes) -> torch.Tensor:
        """The transformer's output for the generated tokens, rows of one prompt length and image layout per call."""
        dtype = self.dtype
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # the pipeline's `_pack_latents`: a plain flatten
        if conditions is not None:
            tokens = torch.cat([conditions.to(tokens), tokens], dim=1)
        shapes = [*((1, h, w) for h, w in condition_shapes or []), (1, height, width)]
        lengths = text["prompt_embeds_mask"].sum(1).tolist()
        layouts: dict[tuple, list[int]] = {}
        for row, length in enumerate(lengths):
            slots = text["image_pad_mask"][row, :length]
            layouts.setdefault((length, slots.cpu().numpy().tobytes()), []).append(row)
        outputs, order = [], []
        for (length, _), rows in layouts.items():
            index = torch.tensor(rows, device=x.device)
            slots = text["image_pad_mask"][rows[0], :length].bool()
            img_mask = torch.cat([slots, slots.new_ones(height * width // 4)]).expand(len(rows), -1)
            out = transformer(
                hidden_states=tokens[index].to(dtype),
                timestep=(sigma[index] * 1000).to(dtype) / 1000,  # the pipeline's `t.to(dtype) / 1000`
                encoder_hidden_states=text["prompt_embeds"][index, :length],
                encoder_hidden_states_mask=None,  # one prompt length: no padding (the pipeline's mask is None)
                img_shapes=[shapes] * len(rows),
                img_mask=img_mask,
                return_dict=False,
            )[0][:, -height * width :]
            outputs.append(out.float())
            order.extend(rows)
        v = torch.cat(outputs)[torch.argsort(torch.tensor(order, device=x.device))]
        return v.transpose(1, 2).reshape(batch, channels, height, width)

    def pipeline_guidance_kwargs(self, guidance_scale: float, negative_prompt: str) -> dict[str, object]:
        """`true_cfg_scale` with the negative prompt; without guidance the pipeline's default `true_cfg_scale=1.0`."""
        if guidance_scale <= 1.0:
            return {}
        return {"true_cfg_scale": guidance_scale, "negative_prompt": negative_prompt}

    def pipeline_image_kwargs(self, images: list, resolution: Resolution) -> dict[str, object]:
        """`image=` (one flat list) and `output_resolution` when it is not the pipeline's 1024."""
        extra = {} if self.condition_side == 1024 else {"output_resolution": self.condition_side}
        return {"image": list(images), **extra} if images else {}

    @torch.no_grad()
    def decode(self, x: torch.Tensor, resolution: Resolution) -> list:
        """The pipeline's decoding: `x · std + mean`, one VAE frame, RGBA images as the pipeline returns them."""
        vae = self.pipeline.vae
        latents = x.unsqueeze(2).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
