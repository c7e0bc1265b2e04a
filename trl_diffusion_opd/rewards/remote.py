"""Rewards computed by a reward server over HTTP: `geneval`, `unifiedreward`, `hpsv2`, `imagereward`.

Their models need environments that do not install beside this package (mmdetection for GenEval, a VLM server for
UnifiedReward; `hpsv2` pins protobuf 3.20 and pytest 7, `image-reward` pins timm 0.6 and pulls another torch), so,
as in Flow-GRPO, they run in a separate process that speaks Flow-GRPO's reward-server protocol (see
`trl_diffusion_opd.rewards.server`): batches of JPEG bytes (with the prompts and metadata rows) in, scores out.

| reward | default URL | response key | server |
|---|---|---|---|
| `geneval` | `http://127.0.0.1:18085` | `strict_rewards` (GenEval's per-image correctness) | Flow-GRPO's `reward-server` (`app_geneval.py`) |
| `unifiedreward` | `http://127.0.0.1:18087` | `outputs` | any server of this protocol |
| `hpsv2` | `http://127.0.0.1:18088` | `outputs` | `server.py --scorer` with an hpsv2 function |
| `imagereward` | `http://127.0.0.1:18089` | `outputs` | `server.py --scorer` with an ImageReward function |

Videos: by default the client sends every frame of a video as an image and averages the frames' scores (what an
image server understands). With `send_videos=True` (a video scorer), a batch of videos goes in one request as
`{"videos": [[JPEG bytes of each frame], ...], "prompts", "meta_datas"}` (no `images` key), one score per video
back; `server.py` decodes such a request into lists of PIL frames for its scorer.

Any other server works through `RemoteReward(url, score_key=...)`. The protocol pickles (Flow-GRPO compatibility):
the client unpickles every answer, so a server you do not run, or anyone who can alter the plain-HTTP traffic, can run
code in the training process. Point clients only at servers you run, on this machine or over a network you trust.
"""

from __future__ import annotations

import io
import pickle
import time
import urllib.error
import urllib.request
from typing import Any

from .base import Reward, register_reward


class RewardServerError(RuntimeError):
    """The reward server could not be reached or answered with an error."""


def jpeg_bytes(image, quality: int | None = None) -> bytes:
    """`image` as JPEG bytes (Pillow's default quality 75, as Flow-GRPO's clients send, unless `quality`)."""
    buffer = io.BytesIO()
    options = {} if quality is None else {"quality": quality}
    image.convert("RGB").save(buffer, format="JPEG", **options)
    return buffer.getvalue()


class RemoteReward(Reward):
    """A reward computed by a server of Flow-GRPO's protocol.

    Args:
        url: The server's address, e.g. `http://127.0.0.1:18085`.
        score_key: Key of the per-image scores in the server's answer; `None` takes `outputs`, else `scores`.
        batch_size: Images per request.
        timeout: Seconds to wait for one answer.
        retries: Further attempts when the server cannot be reached (with `backoff` seconds, doubling, between).
        jpeg_quality: JPEG quality of the images sent; `None` is Pillow's default (75).
        extra: More fields of every request (e.g. GenEval's `only_strict`).
        score_range: `(low, high)` that normalises the score for the evaluation's Average.
        send_videos: Send videos as videos (`"videos"`: the JPEG frames of each) for a server that scores videos;
            `False` sends their frames as images and averages the frames' scores. `batch_size` then counts videos.
    """

    batch_size = 64

    def __init__(
        self,
        url: str,
        score_key: str | None = None,
        batch_size: int | None = None,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        jpeg_quality: int | None = None,
        extra: dict[str, Any] | None = None,
        score_range: tuple[float, float] | None = None,
        name: str = "remote",
        send_videos: bool = False,
    ):
        self.url = url if "://" in url else f"http://{url}"
        self.score_key = score_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.jpeg_quality = jpeg_quality
        self.extra = dict(extra or {})
        self.name = name
        self.accepts_video = bool(send_videos)
        if batch_size is not None:
            self.batch_size = batch_size
        if score_range is not None:
            self.score_range = tuple(score_range)

    def _post(self, payload: bytes) -> bytes:
        request = urllib.request.Request(
            self.url, data=payload, method="POST", headers={"Content-Type": "application/octet-stream"}
        )
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                text = error.read().decode("utf-8", "replace").strip()
                last = text.splitlines()[-1] if text else error.reason
                raise RewardServerError(
                    f"Reward '{self.name}': the server at {self.url} failed with HTTP {error.code}: {last}"
                ) from error
            except (TimeoutError, urllib.error.URLError, ConnectionError) as error:
                if attempt == self.retries:
                    reason = getattr(error, "reason", error)
                    raise RewardServerError(
                        f"Reward '{self.name}': no reward server answers at {self.url} ({reason}) after "
                        f"{self.retries + 1} attempt(s). Start it (docs/rewards_evaluation.md, 'Reward servers') or "
                        "pass its `url`."
                    ) from error
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def score(self, images, prompts, metadata):
        videos = [isinstance(item, list) for item in images]
        if any(videos):  # only with `send_videos`: the base class passes videos as lists of PIL frames
            if not all(videos):
                raise ValueError(f"Reward '{self.name}': a batch mixes images and videos; send one kind per call.")
            media = {"videos": [[jpeg_bytes(frame, self.jpeg_quality) for frame in video] for video in images]}
        else:
            media = {"images": [jpeg_bytes(image, self.jpeg_quality) for image in images]}
        payload = {
            **media,
            "prompts": list(prompts),
            "meta_datas": list(metadata),
            **self.extra,
        }
        body = self._post(pickle.dumps(payload))
        try:
            answer = pickle.loads(body)
        except Exception as error:  # pickle raises many types on bytes that are not a pickle
            raise RewardServerError(
                f"Reward '{self.name}': the server at {self.url} answered {len(body)} bytes that do not decode as "
                f"a pickle ({type(error).__name__}: {error}); is it a server of Flow-GRPO's protocol? Starts with "
                f"{body[:40]!r}."
            ) from error
        if not isinstance(answer, dict):
            raise RewardServerError(f"Reward '{self.name}': the server answered {type(answer).__name__}, not a dict.")
        key = self.score_key or ("outputs" if "outputs" in answer else "scores")
        if key not in answer:
            raise RewardServerError(
                f"Reward '{self.name}': the server's answer has no '{key}' (keys: {sorted(answer)}); set `score_key`."
            )
        values = answer[key]
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
            raise RewardServerError(
                f"Reward '{self.name}': the server's '{key}' is a {type(values).__name__}, not a list of scores: "
                f"{str(values)[:80]!r}."
            )
        try:
            scores = [float(value) for value in values]
        except (TypeError, ValueError) as error:
            raise RewardServerError(
                f"Reward '{self.name}': the server's '{key}' holds a value that is not a number ({error})."
            ) from error
        if len(scores) != len(images):
            raise RewardServerError(
                f"Reward '{self.name}': the server returned {len(scores)} '{key}' for {len(images)} images."
            )
        return scores


def _remote(name: str, url: str, score_key: str | None, score_range, help: str, **defaults):
    def factory(url: str = url, score_key: str | None = score_key, **kwargs) -> RemoteReward:
        kwargs.setdefault("score_range", score_range)
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        return RemoteReward(url, score_key=score_key, name=name, **kwargs)

    factory.__doc__ = help
    register_reward(name, help)(factory)


_remote(
    "geneval",
    "http://127.0.0.1:18085",
    "strict_rewards",
    (0.0, 1.0),
    "GenEval (object detection checks of the prompt's metadata), through Flow-GRPO's reward-server.",
    extra={"only_strict": False},
)
_remote(
    "unifiedreward", "http://127.0.0.1:18087", "outputs", (0.0, 5.0), "UnifiedReward (1-5), through a reward server."
)
_remote("hpsv2", "http://127.0.0.1:18088", "outputs", (0.0, 1.0), "HPSv2.1, through a reward server.")
_remote("imagereward", "http://127.0.0.1:18089", "outputs", (-2.0, 2.0), "ImageReward, through a reward server.")
