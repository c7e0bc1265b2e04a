"""Z-Image (`ZImagePipeline`): `Tongyi-MAI/Z-Image` (base) and `Tongyi-MAI/Z-Image-Turbo`."""

from __future__ import annotations

from numbers import Real

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from diffusers.utils.torch_utils import randn_tensor

from ..sizes import Resolution, image_size
from .base import Cond, FlowMatchingFamily, register_family


# `ZImagePipeline.__call__`'s default prompt length.
DEFAULT_MAX_SEQUENCE_LENGTH = 512


@register_family
class ZImageFamily(FlowMatchingFamily):
    """Z-Image: latents `(B, 16, H/8, W/8)`, static-shift Euler schedule, Qwen3 prompt embeddings, and a transformer
    that is fed `1 − sigma` and predicts `x0 − ε`, the negative of the package's velocity.

    What `ZImagePipeline.__call__` (diffusers 0.42) does, and this family reproduces:

    - **Timestep and sign.** The transformer receives `(1000 − 1000·sigma) / 1000` (1 = clean image) and its output
      is negated before the Euler step. `velocity` returns the negated output, i.e. `dx/dsigma` with sigma = 1 noise
      like every family, so the trainer's step and KL run on the same time axis as SD3's.
    - **Guidance.** `guidance_scale` means what it means to the pipeline: `w > 0` turns CFG on with
      `pos + w (pos − neg)`, i.e. standard CFG with scale `1 + w`. The trainer passes the negative prompt only when
      `guidance_scale > 1`, so `0 < w <= 1` raises an error rather than silently dropping guidance; `w = 0`
      (Z-Image-Turbo's setting) runs the conditional model alone.
    - **CFG truncation** (`cfg_truncation`, the pipeline's default 1.0 never truncates): rows whose `1 − sigma`
      exceeds it use the conditional prediction alone. **CFG renormalisation** (`cfg_normalization`, off by
      default): the guided prediction of each row is scaled down to at most `cfg_normalization · ‖pos‖` (norms over
      the whole latent). Both are per-row functions of `(x, sigma)`, so the transition stays Gaussian and exact.
    - **Prompts.** The pipeline's own `_encode_prompt`: the Qwen3 chat template (thinking enabled), the
      penultimate hidden layer, padding dropped, which gives one variable-length tensor per prompt. The trainer's
      `Cond` needs tensors that share the batch dimension, so they are stored padded to `max_sequence_length`
      (default 512, the pipeline's) with zeros and a boolean `prompt_mask`; `velocity` drops the padding again
      before the transformer sees the captions, so the padding cannot change the velocity.

    Args:
        pipeline: The `ZImagePipeline`.
        max_sequence_length: Prompt token length (the pipeline's `max_sequence_length`); defaults to 512.
        cfg_truncation: The pipeline's `cfg_truncation`: CFG is skipped where `1 − sigma > cfg_truncation`.
        cfg_normalization: The pipeline's `cfg_normalization` (`False`/`0` off, `True` = 1.0, or the factor `c`).

    Both options are also the config's `family_kwargs`, e.g. `family_kwargs: {cfg_truncation: 0.9}` in a YAML file.
    """

    pipeline_class = ZImagePipeline
    name = "zimage"
    tag = "z-image"
    # Attention and SwiGLU projections of every block (main layers and the noise / context refiners).
    default_lora_targets = [
        "attention.to_k",
        "attention.to_out.0",
        "attention.to_q",
        "attention.to_v",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ]

    def __init__(
        self,
        pipeline: ZImagePipeline,
        max_sequence_length: int | None = None,
        cfg_truncation: float | None = 1.0,
        cfg_normalization: bool | float = False,
    ):
        super().__init__(pipeline, max_sequence_length)
        if cfg_truncation is not None and (isinstance(cfg_truncation, bool) or not isinstance(cfg_truncation, Real)):
            raise ValueError(f"Z-Image's `cfg_truncation` must be a number or None, got {cfg_truncation!r}.")
        if not isinstance(cfg_normalization, Real) or cfg_normalization < 0:
            raise ValueError(
                f"Z-Image's `cfg_normalization` must be a boolean or a number >= 0, got {cfg_normalization!r}."
            )
        self.cfg_truncation = cfg_truncation
        self._cfg_normalization_arg = cfg_normalization
        self.cfg_normalization = float(cfg_normalization or 0.0)

    def _latent_size(self, resolution: Resolution) -> tuple[int, int]:
        # `ZImagePipeline.prepare_latents`: the transformer patchifies 2x2, so each latent side is even.
        height, width = (2 * (side // (self.vae_scale_factor * 2)) for side in image_size(resolution))
        return height, width

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Qwen3 embeddings `prompt_embeds` `(B, L, D)` (zero beyond each prompt's tokens) and `prompt_mask`
        `(B, L)` bool, with `L = max_sequence_length`."""
        length = self.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        # `_encode_prompt` rewrites the list in place with the chat template: hand it a copy.
        embeds = self.pipeline._encode_prompt(list(prompts), device=self.device, max_sequence_length=length)
        padded = torch.zeros(len(embeds), length, embeds[0].shape[-1], device=self.device, dtype=self.dtype)
        mask = torch.zeros(len(embeds), length, device=self.device, dtype=torch.bool)
        for i, e in enumerate(embeds):
            padded[i, : e.shape[0]] = e.to(self.dtype)
            mask[i, : e.shape[0]] = True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    def sigmas(self, num_steps: int, resolution: Resolution) -> torch.Tensor:
        # As `ZImagePipeline.__call__`: sigmas linspace(1, 1/N, N), then the scheduler's shift (static for the
        # published checkpoints, where `mu` is computed but unused) and a terminal 0.
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
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_steps), mu=mu, device="cpu")
        return scheduler.sigmas.float()

    def init_latents(self, batch_size: int, resolution: Resolution, generator: torch.Generator | None = None):
        shape = (batch_size, self.transformer.config.in_channels, *self._latent_size(resolution))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def _model_output(self, transformer, x: torch.Tensor, t_model: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The raw transformer output (`x0 − ε`), float32 `(B, C, h, w)`, for the transformer's timestep `t_model`."""
        captions = [e[m] for e, m in zip(cond["prompt_embeds"], cond["prompt_mask"])]
        frames = list(x.to(self.dtype).unsqueeze(2).unbind(0))  # (C, 1, h, w) per row: one frame per image
        out = transformer(frames, t_model, captions, return_dict=False)[0]
        return torch.stack([o.float() for o in out]).squeeze(2)

    def velocity(self, transformer, x, sigma, cond, guidance_scale=0.0, negative_cond=None):
        # The default is no guidance, which for Z-Image is w = 0 (w = 1 is CFG with scale 2).
        # The pipeline's own arithmetic (from the scheduler's timestep 1000·sigma), so the values match bit for bit.
        t_model = (1000 - sigma.float() * 1000) / 1000
        cfg_rows = torch.zeros_like(sigma, dtype=torch.bool)
        if guidance_scale > 0:
            if negative_cond is None:
                raise ValueError(
                    f"Z-Image runs classifier-free guidance for every guidance_scale > 0 (pos + w (pos - neg)), but "
                    f"no negative conditioning was given for guidance_scale={guidance_scale}: the trainer passes one "
                    "only when guidance_scale > 1. Use guidance_scale 0 (no CFG) or > 1."
                )
            cfg_rows = torch.ones_like(cfg_rows)
            if self.cfg_truncation is not None and float(self.cfg_truncation) <= 1:
                cfg_rows = t_model.double() <= float(self.cfg_truncation)
        index = cfg_rows.nonzero().flatten()
        if len(index) == 0:
            return -self._model_output(transformer, x, t_model, cond)
        # One batched call, conditional rows first as the pipeline orders them, then negatives of the CFG rows.
        both = {k: torch.cat([cond[k], negative_cond[k][index]]) for k in cond}
        out = self._model_output(transformer, torch.cat([x, x[index]]), torch.cat([t_model, t_model[index]]), both)
        pred, neg = out[: x.shape[0]], out[x.shape[0] :]
        pos = pred[index]
        guided = pos + guidance_scale * (pos - neg)
        if self.cfg_normalization > 0:
            pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)
            new_norm = torch.linalg.vector_norm(guided.flatten(1), dim=1)
            max_norm = pos_norm * self.cfg_normalization
            scale = torch.where(new_norm > max_norm, max_norm / new_norm, torch.ones_like(new_norm))
            guided = guided * scale.view(-1, *([1] * (guided.ndim - 1)))
        pred = pred.index_copy(0, index, guided)
        return -pred

    def pipeline_guidance_kwargs(self, guidance_scale: float, negative_prompt: str) -> dict[str, object]:
        """The pipeline's `guidance_scale` (its `w`), with `cfg_truncation` / `cfg_normalization` when they differ
        from the pipeline's defaults (1.0, `False`)."""
        kwargs: dict[str, object] = {"guidance_scale": guidance_scale}
        if self.cfg_truncation != 1.0:
            kwargs["cfg_truncation"] = self.cfg_truncation
        if self.cfg_normalization > 0:
            kwargs["cfg_normalization"] = self._cfg_normalization_arg
        return kwargs

    @torch.no_grad()
    def decode(self, x: torch.Tensor, resolution: Resolution) -> list:
        vae = self.pipeline.vae
        latents = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pil")
