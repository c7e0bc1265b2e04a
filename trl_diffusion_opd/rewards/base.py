"""The reward interface and its registry.

A reward scores generated images: `reward(images, prompts, metadata) -> list[float]`, one float per image, where
`metadata[i]` is the prompt row of image i (the prompt itself and every other field of its `.jsonl` line, e.g.
GenEval's `include` list). A reward that has no score for an image (an OCR prompt without quoted text) returns
`nan` for it; averages skip those.

Videos: a sample may be a video instead of an image: a list of PIL frames (what the Wan family decodes to and
`WanPipeline(output_type="pil")` returns), an array `(F, H, W, C)` (`output_type="np"`, floats in [0, 1] or uint8) or
a tensor `(F, C, H, W)` in [0, 1] (`output_type="pt"`); a whole batch may also be one array or tensor with the batch
first, `(B, F, ...)`. Every reward scores videos: an image reward (`accepts_video = False`, the default) scores each
frame as an image (with the video's prompt and metadata row) and a video gets the nan-skipping mean of its frames'
scores; a video reward (`accepts_video = True`, e.g. `temporal_consistency`) receives each video as its list of PIL
frames.

Rewards are found by name (`get_reward("pickscore", device="cuda")`), are loaded once per (name, arguments) and
score in batches of `batch_size`. Register a new one with `@register_reward("name")` on a `Reward` subclass, or wrap
any function of that signature with `as_reward(fn, name)`.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..registry import load_plugins


# {name: (factory, help)}; a factory returns a `Reward` (usually the class itself).
_REGISTRY: dict[str, tuple[Callable[..., Reward], str]] = {}
# Loaded rewards, keyed by (name, arguments): a model is loaded once per process.
_LOADED: dict[tuple[str, str], Reward] = {}


class Reward(abc.ABC):
    """Base class of rewards: subclasses implement `score` for one batch.

    Attributes:
        name: Registry name, used in metric names (`rewards/{task}/{name}`) and table columns.
        score_range: `(low, high)` that maps a score to [0, 1] for the evaluation's "Average" column
            (`(score - low) / (high - low)`); `None` leaves the reward out of the average.
        batch_size: Images (or videos, for a video reward; frames, for an image reward scoring videos) scored per
            call of `score`.
        accepts_video: `score` receives videos as lists of PIL frames (a video reward); `False` (an image reward)
            scores the frames of a video one by one and averages them.
    """

    name: str = "reward"
    score_range: tuple[float, float] | None = None
    batch_size: int = 16
    # Whether `score` takes videos (lists of PIL frames) itself; otherwise videos are scored frame by frame.
    accepts_video: bool = False

    @abc.abstractmethod
    def score(self, images: list, prompts: list[str], metadata: list[dict]) -> Sequence[float]:
        """Scores of one batch (at most `batch_size` images), one per image."""

    def __call__(
        self, images: Sequence, prompts: Sequence[str] | None = None, metadata: Sequence[dict] | None = None
    ) -> list[float]:
        """Score `images` (PIL images, or videos: see the module docstring) for their `prompts` in batches; returns
        one float per image or video."""
        images = list(images)
        count = len(images)
        prompts = [""] * count if prompts is None else list(prompts)
        metadata = [{} for _ in range(count)] if metadata is None else [dict(m or {}) for m in metadata]
        if len(prompts) != count or len(metadata) != count:
            raise ValueError(
                f"Reward '{self.name}': {count} images but {len(prompts)} prompts and {len(metadata)} metadata rows."
            )
        videos = [video_frames(item) for item in images]
        if any(frames is not None for frames in videos):
            if not self.accepts_video:
                return self._frame_means(images, videos, prompts, metadata)
            images = [item if frames is None else frames for item, frames in zip(images, videos)]
        scores: list[float] = []
        size = max(1, int(self.batch_size))
        for start in range(0, count, size):
            stop = start + size
            batch = list(self.score(images[start:stop], prompts[start:stop], metadata[start:stop]))
            if len(batch) != len(images[start:stop]):
                raise RuntimeError(
                    f"Reward '{self.name}' returned {len(batch)} scores for {len(images[start:stop])} images."
                )
            scores.extend(float(value) for value in batch)
        return scores

    def _frame_means(self, images: list, videos: list, prompts: list[str], metadata: list[dict]) -> list[float]:
        """Every frame scored as an image (with its video's prompt and row); per video the nan-skipping mean."""
        flat, flat_prompts, flat_rows, counts = [], [], [], []
        for item, frames, prompt, row in zip(images, videos, prompts, metadata):
            frames = [item] if frames is None else frames
            if not frames:
                raise ValueError(f"Reward '{self.name}': a video without frames.")
            flat.extend(frames)
            flat_prompts.extend([prompt] * len(frames))
            flat_rows.extend(dict(row) for _ in frames)
            counts.append(len(frames))
        scores = self(flat, flat_prompts, flat_rows)
        means, start = [], 0
        for count in counts:
            means.append(nanmean(scores[start : start + count]))
            start += count
        return means

    def normalize(self, value: float) -> float:
        """`value` mapped to [0, 1] by `score_range` (nan without a range)."""
        if self.score_range is None:
            return math.nan
        low, high = self.score_range
        return (value - low) / (high - low)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionReward(Reward):
    """A plain function `fn(images, prompts, metadata) -> list[float]` as a `Reward`."""

    def __init__(
        self,
        fn: Callable[[list, list[str], list[dict]], Sequence[float]],
        name: str | None = None,
        score_range: tuple[float, float] | None = None,
        batch_size: int = 64,
    ):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")
        self.score_range = score_range
        self.batch_size = batch_size

    def score(self, images, prompts, metadata):
        return self.fn(images, prompts, metadata)


def as_reward(reward: Reward | Callable | str, name: str | None = None, **kwargs: Any) -> Reward:
    """A `Reward` from a registry name (with `kwargs`), a `Reward`, or a function `fn(images, prompts, metadata)`."""
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str):
        return get_reward(reward, **kwargs)
    if callable(reward):
        return FunctionReward(reward, name=name, **kwargs)
    raise TypeError(f"A reward is a name, a `Reward` or a function, got {type(reward).__name__}: {reward!r}")


def register_reward(name: str, help: str = ""):
    """Decorator that registers a `Reward` subclass (or a factory returning one) under `name`."""

    def decorator(factory):
        _REGISTRY[name] = (factory, help or (factory.__doc__ or "").strip().split("\n")[0])
        return factory

    return decorator


def reward_names() -> list[str]:
    """The registered reward names (plug-ins' included), sorted."""
    load_plugins()
    return sorted(_REGISTRY)


def reward_help() -> dict[str, str]:
    """`{name: one-line description}` of the registered rewards."""
    return {name: _REGISTRY[name][1] for name in reward_names()}


def load_reward_spec(value: Any, name: str = "rewards") -> Any:
    """`value` with a JSON string (one starting with `{` or `[`) parsed; anything else as it is."""
    if isinstance(value, str) and value.strip().startswith(("{", "[")):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{name}` is not valid JSON ({error}): {value!r}") from error
    return value


def parse_reward_spec(value: Any, name: str = "rewards") -> list | dict[str, list]:
    """Rewards as the configs, the commands and the callbacks take them: `None`, a name, `"a,b"`, a `Reward` or a
    function, a list of those, `{task: any of these}`, or a JSON string of a list or mapping.

    Args:
        value: The spec.
        name: The field named by the one-line errors.

    Returns:
        The rewards as a list, or `{task: list}` for a mapping (names stay strings; nothing is loaded).
    """
    value = load_reward_spec(value, name)
    if isinstance(value, dict):
        return {
            task: _reward_items(
                rewards, f"`{name}['{task}']` must be a reward name or a list of them, got {rewards!r}."
            )
            for task, rewards in value.items()
        }
    accepted = "None, 'a,b', a list of reward names or {task: [reward names]}"
    return _reward_items(value, f"`{name}` must be {accepted}, got {type(value).__name__}: {value!r}.")


def _reward_items(value: Any, error: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    if callable(value):  # a `Reward` or a function
        return [value]
    raise ValueError(error)


def _key(kwargs: dict[str, Any]) -> str:
    return json.dumps(kwargs, sort_keys=True, default=repr)


def get_reward(name: str, **kwargs: Any) -> Reward:
    """The reward registered as `name`, built with `kwargs` (model ids, `device`, `batch_size`, a server `url`, ...).

    A reward is loaded once per process for the same name and arguments; later calls return the same object.

    Raises:
        ValueError: no reward has this name.
    """
    if name not in _REGISTRY:
        load_plugins()  # a plug-in (e.g. the tiny world) may register it
    if name not in _REGISTRY:
        raise ValueError(f"Unknown reward '{name}'; available rewards: {', '.join(reward_names())}.")
    key = (name, _key(kwargs))
    if key not in _LOADED:
        reward = _REGISTRY[name][0](**kwargs)
        reward.name = name
        _LOADED[key] = reward
    return _LOADED[key]


def clear_reward_cache() -> None:
    """Forget the loaded rewards (their models are freed once nothing else holds them)."""
    _LOADED.clear()


def video_frames(sample: Any) -> list | None:
    """The frames of `sample` as RGB PIL images when it is a video, `None` when it is a single image.

    A video is a list or tuple of PIL images, a numpy array `(F, H, W, C)` (floats in [0, 1] or uint8, `C` 1, 3 or
    4) or a torch tensor `(F, C, H, W)` in [0, 1] (diffusers' video outputs for `output_type` `"pil"`, `"np"`,
    `"pt"`). A one-frame video is still a video.

    Raises:
        ValueError: an array or tensor that is neither one image (3 dims) nor a video (4 dims).
    """
    import numpy as np
    from PIL import Image

    if isinstance(sample, (list, tuple)):
        return [frame.convert("RGB") if isinstance(frame, Image.Image) else _to_pil(frame) for frame in sample]
    if hasattr(sample, "detach") and hasattr(sample, "permute"):  # a torch tensor, channels first
        if sample.ndim == 4:
            array = sample.detach().float().cpu().permute(0, 2, 3, 1).numpy()
            return [_to_pil(frame) for frame in array]
        if sample.ndim != 3:
            raise ValueError(f"A video tensor is (F, C, H, W), an image (C, H, W); got shape {tuple(sample.shape)}.")
        return None
    if isinstance(sample, np.ndarray):
        if sample.ndim == 4:
            return [_to_pil(frame) for frame in sample]
        if sample.ndim not in (2, 3):
            raise ValueError(f"A video array is (F, H, W, C), an image (H, W, C); got shape {sample.shape}.")
    return None


def _to_pil(frame: Any):
    """One frame `(H, W, C)` (floats in [0, 1] or uint8) as an RGB PIL image."""
    import numpy as np
    from PIL import Image

    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    array = np.asarray(frame)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite-or-infinite values that are not nan; nan when there are none."""
    kept = [float(v) for v in values if not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else math.nan


def default_device(device: Any = None):
    """`device`, else the first CUDA device when there is one, else the CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
