"""FLUX.1 Kontext (`FluxKontextPipeline`): FLUX.1 editing with one reference image per row."""

from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from ..sizes import image_size
from .base import Cond, register_family
from .flux import FluxFamily


@register_family
class FluxKontextFamily(FluxFamily):
    """FLUX.1 Kontext: FLUX.1's text encoders, schedule, latents and guidance embedding, plus the row's reference
    image as tokens appended after the generated ones (`FluxFamily.velocity`), with the generated tokens' position
    ids but first coordinate 1, on both CFG branches. The text encoders never see the image; the shift counts the
    generated tokens only; every step is a plain Euler step of the generated latents (`FluxKontextPipeline.__call__`).

    The reference is prepared as the pipeline does: its size floored to a multiple of 16 (VAE factor x 2x2
    packing), with `auto_resize` (the pipeline's `_auto_resize`, on by default) first replaced by the one of
    `PREFERRED_KONTEXT_RESOLUTIONS` nearest its aspect ratio; resized (Lanczos), VAE-encoded at the posterior mode,
    shifted and scaled, packed. Rows without an image are plain FLUX.1 text-to-image rows, as in the pipeline.

    The output size is the config's `resolution`; `FluxKontextPipeline.__call__` rescales any `height` x `width` to
    `max_area` (1024² by default), so pass `max_area=height * width` to sample the size trained.

    With `size_from_image`, each row's output size is its reference's (the pipeline's default is 1024², whatever the
    image); rows of other sizes are batched apart.

    Args:
        auto_resize: Snap the reference to Kontext's preferred resolutions (`_auto_resize` of the pipeline).
        size_from_image: Each row's output size from its reference.
    """

    pipeline_class = FluxKontextPipeline
    name = "flux-kontext"
    tag = "flux-kontext"
    pipeline_tag = "image-to-image"
    max_input_images = 1

    def __init__(
        self, pipeline, max_sequence_length=None, num_frames=None, auto_resize: bool = True, size_from_image=False
    ):
        super().__init__(pipeline, max_sequence_length, num_frames)
        for name, value in (("auto_resize", auto_resize), ("size_from_image", size_from_image)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` of the flux-kontext family must be true or false, got {value!r}.")
        self.auto_resize = auto_resize
        self.size_from_image = size_from_image

    def batch_key(self, cond: Cond) -> tuple:
        """The shapes and the reference's position ids (references of other sizes can make as many tokens)."""
        ids = cond.get("image_ids")
        return (*super().batch_key(cond), None if ids is None else ids.cpu().numpy().tobytes())

    def output_resolution(self, cond: Cond) -> tuple[int, int] | None:
        """With `size_from_image`, the reference's size (with `auto_resize`, its preferred Kontext resolution)."""
        if not self.size_from_image or "image_ids" not in cond:
            return None
        rows, cols = (int(cond["image_ids"][0, :, axis].max()) + 1 for axis in (1, 2))
        return rows * self.resolution_multiple, cols * self.resolution_multiple

    def pipeline_image_kwargs(self, images: list, resolution) -> dict[str, object]:
        """One reference, `max_area` of the output (the pipeline rescales any size to it) and `_auto_resize`; a
        text-only row needs `max_area` too."""
        height, width = image_size(resolution)
        if not images:
            return {"max_area": height * width}
        return {"image": images[0], "max_area": height * width, "_auto_resize": self.auto_resize}

    def reference_size(self, image) -> tuple[int, int]:
        """`(height, width)` in pixels the pipeline resizes the reference `image` (PIL) to."""
        pipe = self.pipeline
        height, width = pipe.image_processor.get_default_height_width(image)
        if self.auto_resize:
            aspect = width / height
            _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        multiple = self.resolution_multiple
        return height // multiple * multiple, width // multiple * multiple

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: list | None = None) -> Cond:
        """FLUX.1's text conditioning, plus for rows with a reference `image_latents` `(B, N_ref, 64)` (packed,
        transformer dtype) and their position ids `image_ids` `(B, N_ref, 3)`. Every row of one call has an image of
        one reference size, or none has an image."""
        cond = super().encode_prompts(prompts)
        if images is None or all(image is None for image in images):
            return cond
        if any(not image for image in images):
            raise ValueError("encode_prompts: every row of one call needs a reference image, or none does.")
        latents, ids = zip(*(self._encode_reference(image) for image in images))
        if len({tuple(t.shape) for t in latents}) > 1:
            raise ValueError("encode_prompts: the rows of one call need reference images of one size.")
        return {**cond, "image_latents": torch.cat(latents), "image_ids": torch.cat(ids)}

    def _encode_reference(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input_images(len(images), "A row")
        pipe, image = self.pipeline, images[0]
        height, width = self.reference_size(image)
        pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(image, height, width), height, width)
        vae = pipe.vae
        home = vae.device
        vae.to(self.device)  # the VAE visits the accelerator for the encoding (training never needs it)
        try:
            latents = pipe._encode_vae_image(pixels.to(self.device, self.dtype), generator=None)
        finally:
            vae.to(home)
        channels, h, w = latents.shape[1:]
        tokens = pipe._pack_latents(latents, 1, channels, h, w)
        ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
        ids[..., 0] = 1  # the references' ids: the generated image's, first coordinate 1
        return tokens.to(self.dtype), ids.unsqueeze(0)
