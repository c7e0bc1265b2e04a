"""Cheap rule-based rewards: no model, deterministic, meaningful on the tiny random pipelines (demo and tests).

All three are in [0, 1] (JPEG compressibility is below 0 only when JPEG's overhead exceeds the raw size of a tiny,
noisy image):

- `brightness`: mean luma (ITU-R 601, Pillow's `"L"` conversion) / 255;
- `saturation`: mean HSV saturation / 255;
- `jpeg_compressibility`: the fraction of the raw RGB bytes that JPEG (quality 95) saves,
  `1 − jpeg_bytes / (3·W·H)`; flat images compress well and score high. (DDPO's `jpeg_compressibility` is the
  negative file size in kB, which depends on the resolution; this one does not.)
"""

from __future__ import annotations

import io

import numpy as np

from .base import Reward, register_reward


@register_reward("brightness")
class BrightnessReward(Reward):
    """Mean luma of the image in [0, 1]."""

    name = "brightness"

    score_range = (0.0, 1.0)
    batch_size = 256

    def score(self, images, prompts, metadata):
        return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


@register_reward("saturation")
class SaturationReward(Reward):
    """Mean HSV saturation of the image in [0, 1]."""

    name = "saturation"

    score_range = (0.0, 1.0)
    batch_size = 256

    def score(self, images, prompts, metadata):
        return [
            float(np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64)[..., 1].mean() / 255.0)
            for image in images
        ]


@register_reward("jpeg_compressibility")
class JpegCompressibilityReward(Reward):
    """Fraction of the raw RGB size that JPEG saves (≤ 1): flatter images score higher."""

    name = "jpeg_compressibility"

    score_range = (0.0, 1.0)
    batch_size = 256

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score(self, images, prompts, metadata):
        scores = []
        for image in images:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=self.quality)
            scores.append(1.0 - buffer.tell() / (3.0 * image.width * image.height))
        return scores
