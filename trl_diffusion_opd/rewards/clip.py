"""CLIP-based rewards through transformers: `clipscore`, `pickscore` and `aesthetic`.

Model ids are arguments (Hub ids or local folders), so tests load tiny random models of the same architecture from a
local Hub cache, and users point at mirrors. Every model is loaded once (see `get_reward`), in eval mode, on
`device` (default: CUDA when available).

- `clipscore`: cosine similarity of the CLIP ViT-L/14 (`openai/clip-vit-large-patch14`) image and text embeddings
  (multiply by 100 for the "CLIPScore" of some papers).
- `pickscore`: PickScore (`yuvalkirstain/PickScore_v1`, processor `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`): the raw
  score `logit_scale · cos(image, text)` (≈ 20–23 for SD3.5 images), as the paper's table reports it; Flow-GRPO
  divides it by 26 for training.
- `aesthetic`: the LAION improved aesthetic predictor (an MLP on the normalised CLIP ViT-L/14 image embedding,
  scores ≈ 1–10), weights from `trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth` (the same
  `sac+logos+ava1-l14-linearMSE` weights) or any local `.pth`/`.safetensors` file.
- `temporal_consistency` (videos): the mean cosine similarity of adjacent frames' CLIP ViT-L/14 image embeddings,
  1 for a still video, lower the more consecutive frames differ in content (flicker, identity or scene changes);
  `nan` for a single image.

Every one of them scores videos too (see `trl_diffusion_opd.rewards.base`): the image rewards per frame, averaged
over the frames of each video.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from .base import Reward, default_device, register_reward


CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
AESTHETIC_PREDICTOR = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_PREDICTOR_FILE = "aesthetic-model.pth"
_MAX_TEXT_TOKENS = 77


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)


class _CLIPReward(Reward):
    """Loads a CLIP processor and model once; subclasses score batches."""

    batch_size = 32

    def __init__(
        self,
        model_id: str,
        processor_id: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        cache_dir: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        batch_size: int | None = None,
    ):
        from transformers import AutoProcessor, CLIPModel

        self.device = default_device(device)
        self.dtype = _dtype(dtype)
        hub = {"cache_dir": cache_dir, "token": token}
        try:
            self.processor = AutoProcessor.from_pretrained(processor_id or model_id, **hub)
            self.model = CLIPModel.from_pretrained(model_id, revision=revision, dtype=self.dtype, **hub)
        except OSError as error:
            raise OSError(
                f"Reward '{self.name}': could not load model '{model_id}' (processor '{processor_id or model_id}'): "
                f"{str(error).strip().splitlines()[0]}"
            ) from error
        self.model.to(self.device).eval().requires_grad_(False)
        if batch_size is not None:
            self.batch_size = batch_size

    def _pixels(self, images) -> torch.Tensor:
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return inputs["pixel_values"].to(self.device, self.dtype)

    def _tokens(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        inputs = self.processor(
            text=list(prompts), padding=True, truncation=True, max_length=_MAX_TEXT_TOKENS, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}

    def _image_embeds(self, images) -> torch.Tensor:
        model = self.model
        pooled = model.vision_model(pixel_values=self._pixels(images)).pooler_output
        return torch.nn.functional.normalize(model.visual_projection(pooled).float(), dim=-1)

    def _text_embeds(self, prompts: list[str]) -> torch.Tensor:
        model = self.model
        pooled = model.text_model(**self._tokens(prompts)).pooler_output
        return torch.nn.functional.normalize(model.text_projection(pooled).float(), dim=-1)


@register_reward("clipscore")
class CLIPScoreReward(_CLIPReward):
    """Cosine similarity of the CLIP ViT-L/14 image and prompt embeddings."""

    name = "clipscore"

    score_range = (0.0, 1.0)

    def __init__(self, model_id: str = CLIP_L14, processor_id: str | None = None, **kwargs: Any):
        super().__init__(model_id, processor_id, **kwargs)

    @torch.no_grad()
    def score(self, images, prompts, metadata):
        return (self._image_embeds(images) * self._text_embeds(prompts)).sum(-1).tolist()


@register_reward("pickscore")
class PickScoreReward(_CLIPReward):
    """PickScore: logit_scale · cos(image, prompt) of yuvalkirstain/PickScore_v1 (raw, ≈ 20–23)."""

    name = "pickscore"

    # Flow-GRPO's training normalisation divides by 26.
    score_range = (0.0, 26.0)

    def __init__(self, model_id: str = PICKSCORE_MODEL, processor_id: str | None = PICKSCORE_PROCESSOR, **kwargs: Any):
        super().__init__(model_id, processor_id, **kwargs)

    @torch.no_grad()
    def score(self, images, prompts, metadata):
        cosine = (self._image_embeds(images) * self._text_embeds(prompts)).sum(-1)
        return (self.model.logit_scale.exp().float() * cosine).tolist()


class AestheticMLP(torch.nn.Module):
    """The LAION improved aesthetic predictor's head: linear layers without activations (the dropouts between them
    are identity at inference), stored as `layers.{i}.weight/bias`. Its sizes are read from the state dict."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        indices = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.weight$", k))})
        if not indices:
            raise ValueError(
                "Not an aesthetic predictor state dict: expected keys 'layers.<i>.weight' and 'layers.<i>.bias', "
                f"got {sorted(state_dict)[:4]}."
            )
        self.layers = torch.nn.ModuleList()
        for index in indices:
            weight = state_dict[f"layers.{index}.weight"]
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data.copy_(weight)
            linear.bias.data.copy_(state_dict[f"layers.{index}.bias"])
            self.layers.append(linear)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            embeds = layer(embeds)
        return embeds


def load_aesthetic_predictor(
    predictor: str = AESTHETIC_PREDICTOR,
    filename: str = AESTHETIC_PREDICTOR_FILE,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> AestheticMLP:
    """The aesthetic MLP from a local `.pth`/`.safetensors` file, or from `filename` in the Hub repo `predictor`."""
    if os.path.isfile(predictor):
        path = predictor
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(predictor, filename, revision=revision, cache_dir=cache_dir, token=token)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = state_dict.get("state_dict", state_dict)
    state_dict = {k.removeprefix("module.").removeprefix("model."): v for k, v in state_dict.items()}
    return AestheticMLP(state_dict)


@register_reward("aesthetic")
class AestheticReward(_CLIPReward):
    """LAION improved aesthetic predictor on CLIP ViT-L/14 image embeddings (≈ 1–10)."""

    name = "aesthetic"

    score_range = (0.0, 10.0)

    def __init__(
        self,
        model_id: str = CLIP_L14,
        processor_id: str | None = None,
        predictor: str = AESTHETIC_PREDICTOR,
        predictor_filename: str = AESTHETIC_PREDICTOR_FILE,
        **kwargs: Any,
    ):
        super().__init__(model_id, processor_id, **kwargs)
        hub = {k: kwargs.get(k) for k in ("cache_dir", "token")}
        self.predictor = load_aesthetic_predictor(predictor, predictor_filename, **hub).to(self.device).eval()
        self.predictor.requires_grad_(False)

    @torch.no_grad()
    def score(self, images, prompts, metadata):
        return self.predictor(self._image_embeds(images)).squeeze(-1).tolist()


@register_reward("temporal_consistency")
class TemporalConsistencyReward(_CLIPReward):
    """Videos: mean cosine similarity of adjacent frames' CLIP image embeddings (1 = still; nan for one image).

    For a video of frames `f_1..f_F` with normalised CLIP image embeddings `e_i`, the score is
    `mean_{i<F} e_i · e_{i+1}` (computed in float64), in [-1, 1]. A static video scores 1; frames that change content
    score lower. It rewards only stability: pair it with a per-frame prompt or quality reward, which a still video
    would not satisfy.

    Args:
        model_id, processor_id: The CLIP model (default ViT-L/14) and its processor.
        frame_batch_size: Frames embedded per vision-model call.
    """

    name = "temporal_consistency"
    score_range = (0.0, 1.0)
    accepts_video = True
    batch_size = 4  # videos per call of `score`

    def __init__(
        self, model_id: str = CLIP_L14, processor_id: str | None = None, frame_batch_size: int = 32, **kwargs: Any
    ):
        super().__init__(model_id, processor_id, **kwargs)
        self.frame_batch_size = max(1, int(frame_batch_size))

    @torch.no_grad()
    def score(self, images, prompts, metadata):
        scores = []
        for video in images:
            if not isinstance(video, list) or len(video) < 2:
                scores.append(float("nan"))  # a single image (or frame) has no adjacent pair
                continue
            embeds = torch.cat(
                [
                    self._image_embeds(video[start : start + self.frame_batch_size])
                    for start in range(0, len(video), self.frame_batch_size)
                ]
            )
            embeds = torch.nn.functional.normalize(embeds.double(), dim=-1)
            scores.append((embeds[:-1] * embeds[1:]).sum(-1).mean().item())
        return scores
