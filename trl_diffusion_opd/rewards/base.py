"""The reward interface and its registry.

A reward scores generated images: `reward(images, prompts, metadata) -> list[float]`, one float per image, where
`metadata[i]` is the prompt row of image i (the prompt itself and every other field of its `.jsonl` line, e.g.
GenEval's `include` list). A reward that has no score for an image (an OCR prompt without quoted text) returns
`nan` for it; averages skip those.

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
        batch_size: Images scored per call of `score`.
    """

    name: str = "reward"
    score_range: tuple[float, float] | None = None
    batch_size: int = 16

    @abc.abstractmethod
    def score(self, images: list, prompts: list[str], metadata: list[dict]) -> Sequence[float]:
        """Scores of one batch (at most `batch_size` images), one per image."""

    def __call__(
        self, images: Sequence, prompts: Sequence[str] | None = None, metadata: Sequence[dict] | None = None
    ) -> list[float]:
        """Score `images` (PIL images) for their `prompts` in batches; returns one float per image."""
        images = list(images)
        count = len(images)
        prompts = [""] * count if prompts is None else list(prompts)
        metadata = [{} for _ in range(count)] if metadata is None else [dict(m or {}) for m in metadata]
        if len(prompts) != count or len(metadata) != count:
            raise ValueError(
                f"Reward '{self.name}': {count} images but {len(prompts)} prompts and {len(metadata)} metadata rows."
            )
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
