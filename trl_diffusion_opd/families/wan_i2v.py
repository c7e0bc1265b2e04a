"""Wan image-to-video (`WanImageToVideoPipeline`): Wan 2.1 I2V 14B (480P / 720P, CLIP image embeddings), Wan 2.2
I2V A14B (two experts) and Wan 2.2 TI2V-5B given a first frame (`expand_timesteps`).

Everything `families/wan.py` says of `WanPipeline` holds (UMT5 prompts, raw `t = 1000·sigma`, CFG iff
`guidance_scale > 1`, the expert switch at `boundary_ratio` with `guidance_scale_2`, the flow-matching Euler step
with UniPC's `flow_shift`). What the input frame adds, as `WanImageToVideoPipeline.__call__` (diffusers 0.42.1,
`pipelines/wan/pipeline_wan_i2v.py`) does it, computed once per row and cached with the prompt (keyed on the pixels):

- The frame is resized (squashed, no crop) to the trained `height x width` (`video_processor.preprocess`).
- Wan 2.1 / 2.2 A14B: the pixel video `[frame, zeros x (F - 1)]` (`[frame, zeros, last frame]` with a second image
  in the row, first-last-frame) is VAE-encoded at the posterior mode and normalised, with a 4-channel mask of the
  kept frames in front (`prepare_latents`): `condition` `(B, 4 + C, F', h, w)`, concatenated after the latents on
  channels at every call, for both CFG branches. The sampler steps all `C x F'` latents, as the pipeline's loop does.
- Wan 2.1: CLIP's penultimate hidden states of the frame (`encode_image`), `image_embeds`, passed as
  `encoder_hidden_states_image` to both CFG branches (with a last frame: both images' tokens, FLF2V checkpoints only).
- TI2V-5B (`expand_timesteps`): only the frame is encoded, `condition` `(B, C, 1, h, w)`. The pipeline feeds
  `(1 - m)·condition + m·latents` (m = 0 on latent frame 0) with timestep 0 on frame 0's tokens, steps all latents,
  and puts the condition back after the loop: latent frame 0 of its state is stepped with a velocity nobody reads and
  never feeds back. So here the sampler's latents are latent frames 1.. only, `(B, C, F' - 1, h, w)`: the
  transformer gets `cat([condition, x])` on frames, its output loses frame 0, and `full_latents` puts the condition
  back before decoding. The per-step KL (and every log-probability) is therefore over exactly what the sampler moves,
  the conditioned frame contributing nothing, and its `"reference"` mean counts only the moved elements.

The first frame's conditioning depends on the output size: the family encodes it at the size `check_resolution`
last accepted (the trainer checks its `resolution` once, before encoding any row).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import PIL.Image
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
from diffusers.utils.torch_utils import randn_tensor

from ..sizes import Resolution, image_size
from .base import Cond, ConfigReader, cond_cat, register_family
from .wan import DEFAULT_NUM_FRAMES, WanFamily


def _with_defaults(config: dict, model_class: type) -> dict:
    """A component's `config.json` completed with its class's defaults (older files leave some keys out)."""
    parameters = inspect.signature(model_class.__init__).parameters.values()
    return {**{p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}, **config}


def check_frame_modes(images: list, where: str) -> None:
    """The VAE takes 3-channel RGB frames: a PIL frame of another mode (RGBA, grayscale, palette; image files are
    read as RGB) is refused in one line naming `where`."""
    for image in images:
        if isinstance(image, PIL.Image.Image) and image.mode != "RGB":
            raise ValueError(
                f"{where} has an input image of mode {image.mode}; the VAE takes RGB frames: convert it "
                "(`image.convert('RGB')`)."
            )


@register_family
class WanImageToVideoFamily(WanFamily):
    """Wan image-to-video students and teachers: each row carries its first frame (`image`), and optionally a last
    frame as a second image where the pipeline takes one (not TI2V-5B). See the module docstring."""

    pipeline_class = WanImageToVideoPipeline
    name = "wan-i2v"
    tag = "wan"
    pipeline_tag = "image-to-video"
    image_task_kind = "image-to-video"
    max_input_images = 2

    def __init__(self, pipeline, max_sequence_length=None, num_frames=None):
        super().__init__(pipeline, max_sequence_length, num_frames)
        self.expand = bool(pipeline.config.get("expand_timesteps", False))
        config = self.transformer.config
        self.clip = config.get("image_dim") is not None
        if self.clip and getattr(pipeline, "image_encoder", None) is None:
            raise ValueError(
                "This Wan 2.1 image-to-video transformer takes CLIP image embeddings: the pipeline needs "
                "its `image_encoder` and `image_processor`."
            )
        if config.get("added_kv_proj_dim") is not None and (max_sequence_length or 512) != 512:
            # the transformer splits the image tokens off as everything past the first 512 (transformer_wan.py)
            raise ValueError(f"Wan 2.1 image-to-video needs `max_sequence_length` 512, got {max_sequence_length}.")
        # TI2V ignores a last frame; plain 2.1 I2V checkpoints cannot take two CLIP images (only FLF2V's can)
        last = not self.expand and (not self.clip or config.get("pos_embed_seq_len") is not None)
        self.max_input_images = 2 if last else 1
        self._size: tuple[int, int] | None = None

    @classmethod
    def check_before_loading(
        cls,
        config: ConfigReader,
        resolution: Resolution,
        num_frames: int | None,
        rows: Iterable[tuple[str, dict[str, Any]]],
    ) -> None:
        """From `model_index.json`, the transformer's and the VAE's configs: sides that are multiples of the VAE's
        spatial factor x the patch, `num_frames` = 1 + a multiple of its temporal factor, and every row with its
        first frame (at most the images the checkpoint takes, RGB), as the family checks them once built."""
        transformer = _with_defaults(config("transformer"), WanTransformer3DModel)
        vae = _with_defaults(config("vae"), AutoencoderKLWan)
        spatial, temporal = vae["scale_factor_spatial"], vae["scale_factor_temporal"]
        multiple = spatial * int(transformer["patch_size"][-1])
        sides = image_size(resolution)
        if any(side % multiple for side in sides):
            nearest = "x".join(str(max(multiple, round(side / multiple) * multiple)) for side in sides)
            raise ValueError(
                f"`resolution` must be a multiple of {multiple} for this {cls.name} pipeline (VAE scale factor "
                f"{spatial} x latent patch {multiple // spatial}), got {'x'.join(map(str, sides))}; e.g. {nearest}."
            )
        frames = num_frames or DEFAULT_NUM_FRAMES
        if (frames - 1) % temporal:
            raise ValueError(f"num_frames must be 1 + a multiple of {temporal}, got {frames}.")
        expand = bool(config(None).get("expand_timesteps", False))
        clip = transformer.get("image_dim") is not None
        most = 2 if not expand and (not clip or transformer.get("pos_embed_seq_len") is not None) else 1
        for where, row in rows:
            images = row.get("image") or []
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            if not images:
                raise ValueError(
                    f"{where} has no `image`: the {cls.name} family ({cls.pipeline_class.__name__}) generates a "
                    "video from each row's first frame."
                )
            if len(images) > most:
                raise ValueError(
                    f"{where} has {len(images)} input images, but the {cls.name} family "
                    f"({cls.pipeline_class.__name__}) takes at most {most}."
                )
            check_frame_modes(images, where)

    def check_resolution(self, resolution: Resolution, name: str = "resolution") -> None:
        """As the base class; the size accepted is also the one the rows' first frames are encoded at."""
        super().check_resolution(resolution, name)
        self._size = image_size(resolution)

    def check_input_images(self, count: int, where: str) -> None:
        """Every row needs its first frame (one line naming the row), and at most `max_input_images` images."""
        if count == 0:
            raise ValueError(
                f"{where} has no `image`: the {self.name} family ({type(self.pipeline).__name__}) "
                "generates a video from each row's first frame."
            )
        super().check_input_images(count, where)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: list | None = None) -> Cond:
        """UMT5 prompts as `WanFamily`, plus each row's first-frame `condition` (and `image_embeds` for Wan 2.1);
        text-only (the negative prompt) when no row has an image."""
        cond = super().encode_prompts(prompts)
        if images is None or all(not image for image in images):
            return cond
        if any(not image for image in images):
            raise ValueError("encode_prompts: every row of one call needs its first frame, or none does.")
        if self._size is None:
            raise ValueError("encode_prompts: call `check_resolution(resolution)` first (the video's size).")
        return {**cond, **cond_cat([self._encode_frames(row) for row in images])}

    def _encode_frames(self, images: list) -> Cond:
        self.check_input_images(len(images), "A row")
        check_frame_modes(images, "A row")
        pipe, (height, width) = self.pipeline, self._size
        first, last = images[0], images[1] if len(images) > 1 else None
        out = {}
        if self.clip:
            embeds = pipe.encode_image(first if last is None else [first, last], self.device)
            out["image_embeds"] = embeds.reshape(1, -1, embeds.shape[-1]).to(self.dtype)

        def pixels(image):
            return pipe.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)

        vae = pipe.vae
        z = vae.config.z_dim
        shape = (1, z, self.latent_frames(), height // self.vae_scale_factor, width // self.vae_scale_factor)
        home = vae.device
        vae.to(self.device)  # the VAE visits the accelerator for the encoding (training never needs it)
        try:
            # `latents` given, so that `prepare_latents` draws no noise from the global generator
            outputs = pipe.prepare_latents(
                pixels(first),
                1,
                z,
                height,
                width,
                self.num_frames,
                torch.float32,
                self.device,
                latents=torch.zeros(shape, device=self.device),
                last_image=None if last is None else pixels(last),
            )
        finally:
            vae.to(home)
        out["condition"] = outputs[1].to(self.dtype)
        return out

    def init_latents(self, batch_size: int, resolution: Resolution, generator: torch.Generator | None = None):
        """The pipeline's initial noise `(B, C, F', h, w)`; with `expand_timesteps`, its frames 1.. only."""
        height, width = (side // self.vae_scale_factor for side in image_size(resolution))
        channels = self.pipeline.vae.config.z_dim
        shape = (batch_size, channels, self.latent_frames(), height, width)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return noise[:, :, 1:].contiguous() if self.expand else noise

    def transformer_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> tuple:
        if "condition" not in cond:
            raise ValueError(f"The {self.name} family needs each row's first frame (`image`).")
        condition = cond["condition"].to(x.dtype)
        extra = {"encoder_hidden_states_image": self._image_embeds(cond)} if self.clip else {}
        if not self.expand:
            return torch.cat([x, condition], dim=1), t, extra
        # frame 0's tokens at timestep 0, the others at t (`first_frame_mask[0][0][:, ::2, ::2] * t`)
        patch = self.transformer.config.patch_size
        per_frame = x.shape[3] // patch[1] * (x.shape[4] // patch[2])
        frames = x.shape[2] // patch[0]
        timestep = torch.cat(
            [torch.zeros_like(t)[:, None].expand(-1, per_frame), t[:, None].expand(-1, frames * per_frame)], 1
        )
        return torch.cat([condition, x], dim=2), timestep, extra

    def _image_embeds(self, cond: Cond) -> torch.Tensor:
        embeds = cond["image_embeds"]
        if self.transformer.config.get("pos_embed_seq_len") is None:
            return embeds
        # FLF2V: the pipeline passes the first and last frame's tokens as two rows, which the transformer re-joins
        return embeds.reshape(embeds.shape[0] * 2, -1, embeds.shape[-1])

    def pipeline_image_kwargs(self, images: list, resolution: Resolution) -> dict[str, object]:
        """`WanImageToVideoPipeline.__call__`'s `image` (the first frame) and, with a second image, `last_image`."""
        if not images:
            return {}
        return {"image": images[0], **({"last_image": images[1]} if len(images) > 1 else {})}

    def moved(self, v: torch.Tensor) -> torch.Tensor:
        """The velocity of the latents the sampler steps: with `expand_timesteps`, without the conditioned frame 0."""
        return v[:, :, 1:] if self.expand else v

    def full_latents(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        """With `expand_timesteps`, the first frame's latents put back in front, as the pipeline does after its
        loop."""
        if not self.expand:
            return x
        return torch.cat([cond["condition"].to(x.device, x.dtype), x], dim=2)
