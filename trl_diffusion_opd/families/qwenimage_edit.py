"""Qwen-Image-Edit-Plus (`QwenImageEditPlusPipeline`: Qwen-Image-Edit-2509 and 2511, one to three references a row)
and Qwen-Image-Edit (`QwenImageEditPipeline`: one reference)."""

from __future__ import annotations

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    calculate_dimensions,
)

from .base import Cond, register_family, split_negative
from .qwenimage import QwenImageFamily


# The Edit pipelines' prompts are not truncated (`max_sequence_length` is only checked <= 1024): rows are padded to this.
DEFAULT_MAX_SEQUENCE_LENGTH = 1024
_TEXT_KEYS = ("prompt_embeds", "prompt_embeds_mask")


@register_family
class QwenImageEditPlusFamily(QwenImageFamily):
    """Qwen-Image-Edit-Plus: Qwen-Image's latents, schedule, true CFG with the norm rescale and decoding, plus per row
    1 to `max_input_images` reference images, as `QwenImageEditPlusPipeline.__call__` uses them:

    - The prompt is encoded by Qwen2.5-VL *with the images* ("Picture k: <|vision_start|><|image_pad|>
      <|vision_end|>" per image, each resized to `condition_image_size` pixels of area at its own aspect, rounded
      to multiples of 32); the template's 64 prefix tokens are dropped. The negative prompt is encoded with the same
      images (`encode_negative`): each row carries its own negative.
    - Each reference is resized to `vae_image_size` pixels of area at its own aspect, VAE-encoded at the posterior
      mode and normalised with the VAE's `latents_mean` / `latents_std`; its tokens follow the generated ones in
      the sequence (`img_shapes` entry k + 1: RoPE frame k + 1), on both CFG branches. With `zero_cond_t` (2511) the
      transformer modulates them at t = 0 itself.
    - The shift counts the generated tokens only; every step is a plain Euler step of the generated latents.

    A row's references are kept as unpacked latents `reference_k` `(1, C, h_k, w_k)`, so rows whose references
    differ in count, order or size have conditionings of other shapes and are never batched together. Every row is
    padded to `max_sequence_length` (default 1024, the pipeline's limit; the images' tokens count).

    The output size is the config's `resolution`, or with `size_from_image` the pipeline's default: `vae_image_size`
    (1024²) of area at the last image's aspect, i.e. the last reference's size; rows of other sizes are batched apart.

    Args:
        vae_image_size: Area in pixels the references are VAE-encoded at (the pipeline's `VAE_IMAGE_SIZE`).
        condition_image_size: Area in pixels of the copies the text encoder sees (`CONDITION_IMAGE_SIZE`).
        size_from_image: Each row's output size from its images, as the pipeline without `height` / `width`.
    """

    pipeline_class = QwenImageEditPlusPipeline
    name = "qwenimage-edit-plus"
    tag = "qwen-image-edit"
    pipeline_tag = "image-to-image"
    # The pipeline sets no limit; Qwen's model cards give 1 to 3 images (each adds ~4k tokens per pass at 1 MP).
    max_input_images = 3
    min_input_images = 1
    supported_transformer_options = ("zero_cond_t",)

    def __init__(
        self,
        pipeline: QwenImageEditPlusPipeline,
        max_sequence_length: int | None = None,
        vae_image_size: int = VAE_IMAGE_SIZE,
        condition_image_size: int = CONDITION_IMAGE_SIZE,
        size_from_image: bool = False,
    ):
        super().__init__(pipeline, max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH)
        if not isinstance(size_from_image, bool):
            raise ValueError(
                f"`size_from_image` of the {self.name} family must be true or false, got {size_from_image!r}."
            )
        self.size_from_image = size_from_image
        for name, value in (("vae_image_size", vae_image_size), ("condition_image_size", condition_image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 32 * 32:
                raise ValueError(
                    f"`{name}` of the {self.name} family must be an area in pixels >= 1024, got {value!r}."
                )
        self.vae_image_size = vae_image_size
        self.condition_image_size = condition_image_size

    @staticmethod
    def _size(area: int, image) -> tuple[int, int]:
        """`(height, width)` of `area` pixels at `image`'s aspect, multiples of 32 (`calculate_dimensions`)."""
        width, height = calculate_dimensions(area, image.width / image.height)
        return int(height), int(width)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: list | None = None) -> Cond:
        """`prompt_embeds` `(B, L, D)` and `prompt_embeds_mask` `(B, L)` (`L = max_sequence_length`), encoded with
        each row's images, and the references `reference_k` `(B, C, h_k, w_k)`. Rows of one call have references of
        the same sizes, or none has any (text only: the negative placeholder of CFG; the pipeline needs images)."""
        if images is None or all(image is None for image in images):
            return super().encode_prompts(prompts)
        if any(not image for image in images):
            raise ValueError("encode_prompts: every row of one call needs reference images, or none does.")
        rows = [
            {**self._encode_text(prompt, row), **self._encode_references(row)} for prompt, row in zip(prompts, images)
        ]
        if len({tuple((k, tuple(v.shape)) for k, v in row.items() if k not in _TEXT_KEYS) for row in rows}) > 1:
            raise ValueError("encode_prompts: the rows of one call need reference images of the same sizes.")
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    def output_resolution(self, cond: Cond) -> tuple[int, int] | None:
        """With `size_from_image`, the last reference's size in pixels."""
        count = sum(key.startswith("reference_") for key in cond)
        if not self.size_from_image or not count:
            return None
        height, width = cond[f"reference_{count - 1}"].shape[-2:]
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    @torch.no_grad()
    def encode_negative(self, negative_prompt: str, images: list) -> Cond:
        """The negative prompt encoded with each row's images, as the pipeline's negative branch sees it."""
        rows = [self._encode_text(negative_prompt, row) for row in images]
        return {key: torch.cat([row[key] for row in rows]) for key in _TEXT_KEYS}

    def _encode_text(self, prompt: str, images: list) -> Cond:
        self.check_input_images(len(images), "A row")
        pipe = self.pipeline
        embeds, mask = pipe.encode_prompt(prompt=[prompt], image=self._shown(images), device=self.device)
        length = self.max_sequence_length
        if embeds.shape[1] > length:
            raise ValueError(
                f"The prompt {prompt!r} with its {len(images)} image(s) is {embeds.shape[1]} tokens long, more than "
                f"max_sequence_length={length}; raise it (at most 1024) or use smaller `condition_image_size`."
            )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = length - embeds.shape[1]
        return {
            "prompt_embeds": F.pad(embeds, (0, 0, 0, pad)).to(self.dtype),
            "prompt_embeds_mask": F.pad(mask.long(), (0, pad)),
        }

    def _shown(self, images: list):
        """What the VL model sees: each image resized to `condition_image_size` of area."""
        processor = self.pipeline.image_processor
        return [processor.resize(image, *self._size(self.condition_image_size, image)) for image in images]

    def _encode_references(self, images: list) -> Cond:
        pipe, vae = self.pipeline, self.pipeline.vae
        home = vae.device
        vae.to(self.device)  # the VAE visits the accelerator for the encoding (training never needs it)
        try:
            references = {}
            for k, image in enumerate(images):
                height, width = self._size(self.vae_image_size, image)
                pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)  # one frame
                latents = pipe._encode_vae_image(pixels.to(self.device, self.dtype), generator=None)
                references[f"reference_{k}"] = latents[:, :, 0].to(self.dtype)
        finally:
            vae.to(home)
        return references

    def velocity(self, transformer, x, sigma, cond, guidance_scale=1.0, negative_cond=None):
        """As `QwenImageFamily.velocity`, with the row's reference tokens after the generated ones on both branches
        and the row's own negative (encoded with its images) in place of `negative_cond` when it carries one."""
        cond, own_negative = split_negative(cond)
        if negative_cond is not None and own_negative is not None:
            negative_cond = own_negative
        references = [cond[f"reference_{k}"] for k in range(sum(key.startswith("reference_") for key in cond))]
        dtype = self.dtype
        height, width = x.shape[-2:]
        shapes = [(1, height // 2, width // 2), *((1, r.shape[-2] // 2, r.shape[-1] // 2) for r in references)]
        reference_tokens = (
            torch.cat([self.pack_latents(r) for r in references], dim=1).to(dtype) if references else None
        )

        def call(tokens, sigma, text):
            embeds, mask = self.trim_padding(text)
            count, tokens = tokens.shape[1], tokens.to(dtype)
            if reference_tokens is not None:  # CFG batches [negative rows, rows]: the references repeat block-wise
                repeat = tokens.shape[0] // reference_tokens.shape[0]
                tokens = torch.cat([tokens, reference_tokens.repeat(repeat, 1, 1)], dim=1)
            return transformer(
                hidden_states=tokens,
                timestep=sigma.to(dtype),  # the pipeline passes t / 1000 = sigma; the model embeds 1000·sigma
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=[shapes] * tokens.shape[0],
                return_dict=False,
            )[0][:, :count]

        text = {k: cond[k] for k in _TEXT_KEYS}
        negative = None if negative_cond is None else {k: negative_cond[k] for k in _TEXT_KEYS}
        v = self.true_cfg_velocity(call, self.pack_latents(x), sigma, text, negative, guidance_scale)
        scale = self.vae_scale_factor
        return self.pipeline._unpack_latents(v, height * scale, width * scale, scale)[:, :, 0]


@register_family
class QwenImageEditFamily(QwenImageEditPlusFamily):
    """Qwen-Image-Edit (`QwenImageEditPipeline`): as Qwen-Image-Edit-Plus with one reference per row, which the VL
    model sees at the VAE's size (`vae_image_size` of area, the pipeline's 1024²) with the template's one
    `<|vision_start|><|image_pad|><|vision_end|>` and no "Picture 1:"."""

    pipeline_class = QwenImageEditPipeline
    name = "qwenimage-edit"
    max_input_images = 1

    def __init__(self, pipeline, max_sequence_length=None, vae_image_size: int = 1024 * 1024, size_from_image=False):
        super().__init__(pipeline, max_sequence_length, vae_image_size, vae_image_size, size_from_image)

    def _shown(self, images: list):
        return super()._shown(images)[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: list | None = None) -> Cond:
        """As Edit-Plus; the template always holds an image, so a text-only call (only the trainer's placeholder
        negative: every row has an image and its own negative) is encoded with a blank one."""
        if images is None or all(image is None for image in images):
            blank = PIL.Image.new("RGB", (32, 32), "white")
            cond = super().encode_prompts(prompts, [[blank]] * len(prompts))
            return {key: cond[key] for key in _TEXT_KEYS}
        return super().encode_prompts(prompts, images)

    def pipeline_image_kwargs(self, images: list, resolution) -> dict[str, object]:
        return {"image": images[0]} if images else {}
