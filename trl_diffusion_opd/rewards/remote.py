"""Rewards computed by a reward server over HTTP: `geneval`, `unifiedreward`, `hpsv2`, `imagereward`.

Their models need environments that do not install beside this package (mmdetection for GenEval, a VLM server for
UnifiedReward; `hpsv2` pins protobuf 3.20 and pytest 7, `image-reward` pins timm 0.6 and pulls another torch), so,
as in Flow-GRPO, they run in a separate process (see `trl_diffusion_opd.rewards.server`): batches of images (with the
prompts and metadata rows) in, scores out.

| reward | default URL | response key | server |
|---|---|---|---|
| `geneval` | `http://127.0.0.1:18085` | `strict_rewards` (per-image correctness) | Flow-GRPO's `reward-server` (pickle) |
| `unifiedreward` | `http://127.0.0.1:18087` | `outputs` | any server of either protocol |
| `hpsv2` | `http://127.0.0.1:18088` | `outputs` | `server.py --scorer` with an hpsv2 function |
| `imagereward` | `http://127.0.0.1:18089` | `outputs` | `server.py --scorer` with an ImageReward function |

Protocol: by default JSON, version 1 (`server.py`'s docstring has the format): images as base64 PNG, answers parsed as
JSON, so neither side runs code the other sent. Requests are split so that none exceeds `max_request_bytes` (the
server's default limit, 256 MiB). `protocol="pickle"` speaks Flow-GRPO's reward-server protocol instead (pickled
requests of JPEG bytes, pickled answers), for Flow-GRPO's own servers: **the client then unpickles every answer, so
the server, or anyone who can alter the plain-HTTP traffic, can run code in the training process**. Use it only
with a server you run, on this machine or over a network you trust. By default a pickled answer is refused unread.

Videos: by default the client sends every frame of a video as an image and averages the frames' scores (what an
image server understands). With `send_videos=True` (a video scorer), a batch of videos goes in one request as
`"videos": [[frame, ...], ...]` (no `images` key), one score per video back; `server.py` decodes such a request into
lists of PIL frames for its scorer.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import time
import urllib.error
import urllib.request
from typing import Any

from .base import Reward, register_reward
from .server import DEFAULT_MAX_REQUEST_BYTES, JSON_TYPE, PROTOCOL_VERSION, json_default


PROTOCOLS = ("json", "pickle")
# Request keys of the protocols; `extra` may not replace them.
_RESERVED = {"version", "images", "videos", "prompts", "metadata", "meta_datas"}


class RewardServerError(RuntimeError):
    """The reward server could not be reached or answered with an error."""


def jpeg_bytes(image, quality: int | None = None) -> bytes:
    """`image` as JPEG bytes (Pillow's default quality 75, as Flow-GRPO's clients send, unless `quality`)."""
    buffer = io.BytesIO()
    options = {} if quality is None else {"quality": quality}
    image.convert("RGB").save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def png_bytes(image) -> bytes:
    """`image` as (lossless) PNG bytes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class RemoteReward(Reward):
    """A reward computed by a reward server (see the module docstring for the protocols).

    Args:
        url: The server's address, e.g. `http://127.0.0.1:18085`.
        score_key: Key of the per-image scores in the server's answer; `None` takes `outputs`, else `scores`.
        batch_size: Images per request (fewer when a request would exceed `max_request_bytes`).
        timeout: Seconds to wait for one answer.
        retries: Further attempts when the server cannot be reached (with `backoff` seconds, doubling, between).
        jpeg_quality: JPEG quality of the images sent as JPEG; `None` is Pillow's default (75).
        extra: More fields of every request (e.g. GenEval's `only_strict`).
        score_range: `(low, high)` that normalises the score for the evaluation's Average.
        send_videos: Send videos as videos (`"videos"`: the frames of each) for a server that scores videos;
            `False` sends their frames as images and averages the frames' scores. `batch_size` then counts videos.
        protocol: `"json"` (version 1, the default: no code runs on either side) or `"pickle"` (Flow-GRPO's
            reward-server protocol, for Flow-GRPO's servers). **Unsafe**: with `"pickle"` the client unpickles the
            server's answers, so the server, or whoever answers in its place, can run code in this process.
        image_format: `"png"` or `"jpeg"` for the images sent; `None` is PNG with `"json"` (lossless) unless
            `jpeg_quality` is given, and JPEG with `"pickle"` (what Flow-GRPO's clients send).
        max_request_bytes: Largest JSON request body; a batch that would be larger goes in several requests, and
            this also bounds the answer read back. Keep it at most the server's `--max-request-mb`.
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
        protocol: str = "json",
        image_format: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"Reward '{name}': `protocol` must be 'json' or 'pickle', got {protocol!r}.")
        if image_format is None:
            image_format = "jpeg" if protocol == "pickle" or jpeg_quality is not None else "png"
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"Reward '{name}': `image_format` must be 'png' or 'jpeg', got {image_format!r}.")
        reserved = sorted(_RESERVED & set(extra or {}))
        if reserved:
            raise ValueError(f"Reward '{name}': `extra` may not set the protocol's own fields {reserved}.")
        if int(max_request_bytes) < 1:
            raise ValueError(f"Reward '{name}': `max_request_bytes` must be positive, got {max_request_bytes}.")
        self.url = url if "://" in url else f"http://{url}"
        self.score_key = score_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.jpeg_quality = jpeg_quality
        self.extra = dict(extra or {})
        self.name = name
        self.accepts_video = bool(send_videos)
        self.protocol = protocol
        self.image_format = image_format
        self.max_request_bytes = int(max_request_bytes)
        if batch_size is not None:
            self.batch_size = batch_size
        if score_range is not None:
            self.score_range = tuple(score_range)

    def _post(self, payload: bytes, content_type: str = JSON_TYPE) -> bytes:
        request = urllib.request.Request(self.url, data=payload, method="POST", headers={"Content-Type": content_type})
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read(self.max_request_bytes + 1)
                if len(body) > self.max_request_bytes:
                    raise RewardServerError(
                        f"Reward '{self.name}': the server at {self.url} answered more than {self.max_request_bytes} "
                        "bytes (`max_request_bytes`); refused."
                    )
                return body
            except urllib.error.HTTPError as error:
                raise RewardServerError(
                    f"Reward '{self.name}': the server at {self.url} failed with HTTP {error.code}: "
                    f"{self._error_line(error)}"
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

    @staticmethod
    def _error_line(error: urllib.error.HTTPError) -> str:
        """The one-line reason of an error answer: the JSON `error` of protocol 1, else the last line of the text."""
        text = error.read(1 << 20).decode("utf-8", "replace").strip()
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            text = answer["error"]
        last = text.splitlines()[-1] if text else str(error.reason)
        return " ".join(last.split())

    def _encode(self, image) -> bytes:
        return png_bytes(image) if self.image_format == "png" else jpeg_bytes(image, self.jpeg_quality)

    def score(self, images, prompts, metadata):
        videos = [isinstance(item, list) for item in images]
        if any(videos):  # only with `send_videos`: the base class passes videos as lists of PIL frames
            if not all(videos):
                raise ValueError(f"Reward '{self.name}': a batch mixes images and videos; send one kind per call.")
            key, media = "videos", [[self._encode(frame) for frame in video] for video in images]
        else:
            key, media = "images", [self._encode(image) for image in images]
        if self.protocol == "pickle":
            payload = {key: media, "prompts": list(prompts), "meta_datas": list(metadata), **self.extra}
            answer = self._pickle_answer(self._post(pickle.dumps(payload), "application/octet-stream"))
            return self._scores(answer, len(images))
        if key == "videos":
            items = [[base64.b64encode(frame).decode("ascii") for frame in video] for video in media]
        else:
            items = [base64.b64encode(data).decode("ascii") for data in media]
        scores = []
        for start, stop in self._requests(key, items, prompts, metadata):
            payload = {
                **self.extra,
                "version": PROTOCOL_VERSION,
                key: items[start:stop],
                "prompts": list(prompts[start:stop]),
                "metadata": list(metadata[start:stop]),
            }
            answer = self._json_answer(self._post(self._dumps(payload)))
            scores.extend(self._scores(answer, stop - start))
        return scores

    def _dumps(self, payload: dict) -> bytes:
        try:
            return json.dumps(payload, default=json_default).encode("utf-8")
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Reward '{self.name}': the request cannot be sent as JSON ({error}); the prompts' metadata rows "
                "must hold JSON values (strings, numbers, lists, dicts)."
            ) from error

    def _requests(self, key: str, items: list, prompts, metadata) -> list[tuple[int, int]]:
        """`(start, stop)` of consecutive requests, each at most `max_request_bytes` long."""
        empty = {**self.extra, "version": PROTOCOL_VERSION, key: [], "prompts": [], "metadata": []}
        base = len(self._dumps(empty))
        sizes = [len(self._dumps([item, prompt, row])) for item, prompt, row in zip(items, prompts, metadata)]
        spans, start, total = [], 0, base
        for i, size in enumerate(sizes):
            if base + size > self.max_request_bytes:
                raise RewardServerError(
                    f"Reward '{self.name}': one {key[:-1]} makes a request of {base + size} bytes, more than "
                    f"`max_request_bytes` ({self.max_request_bytes}); raise it and the server's --max-request-mb."
                )
            if i > start and total + size > self.max_request_bytes:
                spans.append((start, i))
                start, total = i, base
            total += size
        if sizes:
            spans.append((start, len(sizes)))
        return spans

    def _json_answer(self, body: bytes) -> dict:
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError) as error:
            hint = ""
            if body[:1] == b"\x80":  # pickle protocol 2+
                hint = " (a pickle, refused unread: only `protocol='pickle'` reads pickles, for a server you run)"
            raise RewardServerError(
                f"Reward '{self.name}': the server at {self.url} answered {len(body)} bytes that are not JSON{hint} "
                f"({type(error).__name__}: {str(error)[:80]}); starts with {body[:40]!r}."
            ) from error
        if not isinstance(answer, dict):
            raise RewardServerError(f"Reward '{self.name}': the server answered {type(answer).__name__}, not a dict.")
        if answer.get("version") != PROTOCOL_VERSION:
            raise RewardServerError(
                f"Reward '{self.name}': the server answered protocol version {answer.get('version')!r}; this client "
                f"speaks {PROTOCOL_VERSION}."
            )
        return answer

    def _pickle_answer(self, body: bytes) -> dict:
        try:
            answer = pickle.loads(body)  # protocol="pickle" only: runs whatever code the answer holds
        except Exception as error:  # pickle raises many types on bytes that are not a pickle
            raise RewardServerError(
                f"Reward '{self.name}': the server at {self.url} answered {len(body)} bytes that do not decode as "
                f"a pickle ({type(error).__name__}: {error}); is it a server of Flow-GRPO's protocol? Starts with "
                f"{body[:40]!r}."
            ) from error
        if not isinstance(answer, dict):
            raise RewardServerError(f"Reward '{self.name}': the server answered {type(answer).__name__}, not a dict.")
        return answer

    def _scores(self, answer: dict, count: int) -> list[float]:
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
        if len(scores) != count:
            raise RewardServerError(
                f"Reward '{self.name}': the server returned {len(scores)} '{key}' for {count} images."
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
    "GenEval (detection checks of the prompt rows' metadata), through a reward server (Flow-GRPO's: protocol=pickle).",
    extra={"only_strict": False},
)
_remote(
    "unifiedreward", "http://127.0.0.1:18087", "outputs", (0.0, 5.0), "UnifiedReward (1-5), through a reward server."
)
_remote("hpsv2", "http://127.0.0.1:18088", "outputs", (0.0, 1.0), "HPSv2.1, through a reward server.")
_remote("imagereward", "http://127.0.0.1:18089", "outputs", (-2.0, 2.0), "ImageReward, through a reward server.")
