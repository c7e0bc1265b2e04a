"""The text-rendering reward: PP-OCR (through `rapidocr-onnxruntime`) against the quoted text of the prompt.

Flow-GRPO's definition: the target is the text inside the **first pair of double quotes** of the prompt
(`A sign that says "Open 24h"` → `Open 24h`); the recognised text is every OCR line joined; both are lower-cased
with whitespace removed; the score is 1 when the target is a substring of the recognised text, else
`1 − min(Levenshtein(recognised, target), len(target)) / len(target)`. Scoring against the whole prompt instead of
the quoted text is a known pitfall: it gives ≈ 0 to perfect renderings.

A prompt without a (non-empty) quoted text has no target: its score is `nan` (skipped by averages) with
`on_missing_text="nan"` (the default), `ValueError` with `"error"`, or the given number. A row's `ocr_text` metadata
field, when present, is the target instead of the quotes.

`rapidocr-onnxruntime` ships the PP-OCR ONNX models inside its wheel, so this reward works offline:
`pip install "trl-diffusion-opd[ocr]"`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from .base import Reward, register_reward


# Straight quotes as in Flow-GRPO's prompts; typographic ones are accepted too.
_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def ocr_target(prompt: str, metadata: dict | None = None) -> str | None:
    """The text an image for `prompt` should show: `metadata["ocr_text"]`, else the first double-quoted span;
    `None` when there is none or it is empty."""
    if metadata and isinstance(metadata.get("ocr_text"), str) and metadata["ocr_text"].strip():
        return metadata["ocr_text"]
    match = _QUOTED.search(prompt)
    if match is None:
        return None
    text = match.group(1) if match.group(1) is not None else match.group(2)
    return text if text.strip() else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between `a` and `b`."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _canonical(text: str) -> str:
    return "".join(text.split()).lower()


def text_similarity(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR score of `recognized` text against `target` (see the module docstring)."""
    recognized, target = _canonical(recognized), _canonical(target)
    if not target:
        raise ValueError("The OCR target is empty.")
    if target in recognized:
        return 1.0
    return 1.0 - min(levenshtein(recognized, target), len(target)) / len(target)


class _RapidOCREngine:
    """`image -> [(text, confidence), ...]` through rapidocr-onnxruntime (PP-OCR det + rec, no angle classifier)."""

    def __init__(self, **kwargs):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as error:
            raise ImportError(
                "The 'ocr' reward needs rapidocr-onnxruntime: pip install 'trl-diffusion-opd[ocr]' "
                "(or pip install rapidocr-onnxruntime)."
            ) from error
        self.engine = RapidOCR(**kwargs)

    def __call__(self, image) -> list[tuple[str, float]]:
        result, _ = self.engine(np.asarray(image.convert("RGB")), use_cls=False)
        return [(str(line[1]), float(line[2])) for line in result or []]


@register_reward("ocr")
class OCRReward(Reward):
    """Text rendering: OCR of the image against the prompt's quoted text (1 = exact), Flow-GRPO's definition.

    Args:
        engine: `image -> [(text, confidence), ...]`; `None` uses PP-OCR through rapidocr-onnxruntime.
        min_confidence: OCR lines below this confidence are ignored.
        on_missing_text: Score of a prompt without quoted text: `"nan"`, `"error"` or a number.
        engine_kwargs: Passed to `rapidocr_onnxruntime.RapidOCR` (e.g. `det_use_cuda=True` with onnxruntime-gpu).
    """

    name = "ocr"
    score_range = (0.0, 1.0)
    batch_size = 16

    def __init__(
        self,
        engine: Callable[[object], Sequence[tuple[str, float]]] | None = None,
        min_confidence: float = 0.0,
        on_missing_text: str | float = "nan",
        **engine_kwargs,
    ):
        if isinstance(on_missing_text, str) and on_missing_text not in ("nan", "error"):
            raise ValueError(f"`on_missing_text` must be 'nan', 'error' or a number, got {on_missing_text!r}.")
        self.engine = engine if engine is not None else _RapidOCREngine(**engine_kwargs)
        self.min_confidence = min_confidence
        self.on_missing_text = on_missing_text

    def recognize(self, image) -> str:
        """Every recognised line above `min_confidence`, joined in the engine's (reading) order."""
        return "".join(text for text, confidence in self.engine(image) if confidence >= self.min_confidence)

    def score(self, images, prompts, metadata):
        scores = []
        for image, prompt, row in zip(images, prompts, metadata):
            target = ocr_target(prompt, row)
            if target is None:
                if self.on_missing_text == "error":
                    raise ValueError(f"OCR reward: the prompt {prompt!r} has no text in double quotes to render.")
                scores.append(math.nan if self.on_missing_text == "nan" else float(self.on_missing_text))
                continue
            scores.append(text_similarity(self.recognize(image), target))
        return scores
