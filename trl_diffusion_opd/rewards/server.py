"""A reward server, so heavy reward models run in their own environment and score images over HTTP.

Protocol version 1 (the default; no code runs on either side): the client POSTs to `/` a JSON object with
`Content-Type: application/json`,

```
{"version": 1,
 "images": ["<base64 of PNG or JPEG bytes>", ...],     # or, for a video scorer,
 "videos": [["<base64 of each frame>", ...], ...],     # one list of frames per video (no "images" key)
 "prompts": ["...", ...],                              # optional: one per image or video
 "metadata": [{...}, ...],                             # optional: the prompt rows, one JSON object per image or video
 ...}                                                  # any other key is ignored (e.g. GenEval's "only_strict")
```

and the server answers 200 with `{"version": 1, "outputs": [...], "scores": [...]}` (one score per image or video; a
scorer returning a dict, e.g. GenEval's `scores`, `strict_rewards`, ..., is sent as it is, plus `version`). Scores are
JSON numbers; `NaN` is written as Python's `json` writes it. A request the server cannot take is answered 4xx with
`{"version": 1, "error": "<one line>", "supported_versions": [1]}` and one log line, and the server keeps serving:
413 when `Content-Length` exceeds the limit (`--max-request-mb`, default 256 MiB; checked before the body is read),
411 without `Content-Length`, 400 for a body that is not a JSON object of a supported version (an unknown `version`
lists the supported ones), for bad base64, or for an image that is not a PNG or JPEG (or is a decompression bomb).
A scorer that raises is answered 500 with the error's last line (and `traceback`).

Pickle (Flow-GRPO's reward-server protocol) only when asked for: started with `--allow-pickle` (`serve(...,
allow_pickle=True)`), a request whose `Content-Type` is not `application/json` is unpickled (`{"images": [JPEG
bytes], "prompts", "meta_datas", ...}`) and answered with a pickle. **Unpickling runs code**: with `--allow-pickle`,
whoever reaches the port can run any command as the server's user. Without it a pickle is refused (400) unread.

The server listens on 127.0.0.1 (this machine only) unless `--host` / `host` says otherwise; across machines use an
SSH tunnel or a private network you trust (the traffic is plain HTTP).

This file needs only the standard library and Pillow, so it runs in the reward model's own environment; copy it there
and serve any function `score(images, prompts, metadata) -> list[float]` (or a dict of lists):

```bash
python server.py --scorer my_scorer:score --port 18088
```
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import io
import json
import logging
import pickle
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


ScoreFunction = Callable[[list, list, list], Any]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DEFAULT_MAX_REQUEST_BYTES = 256 * 1024 * 1024
JSON_TYPE = "application/json"

logger = logging.getLogger("trl_diffusion_opd.reward_server")


class RequestError(Exception):
    """A request the server refuses: answered with HTTP `status` (4xx) and the one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _response(result: Any, count: int) -> dict:
    if isinstance(result, dict):
        return result
    scores = [float(value) for value in result]
    if len(scores) != count:
        raise ValueError(f"the scorer returned {len(scores)} scores for {count} images")
    return {"outputs": scores, "scores": scores}


def _decode(data: bytes, where: str = "an image") -> Image.Image:
    try:
        with warnings.catch_warnings():  # Pillow only warns below twice its pixel limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestError(400, f"{where} is not a PNG or JPEG image ({type(error).__name__}: {error})") from error


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"{where} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, f"{where} is not valid base64 ({error})") from error


def _list(request: dict, key: str, count: int | None) -> list | None:
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise RequestError(400, f"'{key}' must be a list, got {type(value).__name__}")
    if count is not None and len(value) != count:
        raise RequestError(400, f"'{key}' has {len(value)} entries for {count} images or videos")
    return value


def parse_json_request(body: bytes) -> tuple[list, list[str], list[dict]]:
    """The images (PIL) or videos (lists of PIL frames), prompts and metadata rows of a protocol-1 JSON request.

    Raises:
        RequestError: (400) the body is not a JSON object of a supported version with valid images.
    """
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as error:
        if body[:1] == b"\x80":  # pickle protocol 2+ starts with PROTO
            raise RequestError(
                400, "a pickle request, refused: this server speaks JSON (start it with --allow-pickle for pickles)"
            ) from error
        raise RequestError(400, f"the body is not JSON ({type(error).__name__}: {str(error)[:100]})") from error
    if not isinstance(request, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(request).__name__}")
    version = request.get("version")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise RequestError(400, f"unsupported protocol version {version!r}; supported versions: {supported}")
    if ("images" in request) == ("videos" in request):
        raise RequestError(400, "the request needs exactly one of 'images' and 'videos'")
    if "videos" in request:
        videos = _list(request, "videos", None)
        images = []
        for i, frames in enumerate(videos):
            if not isinstance(frames, list):
                raise RequestError(400, f"videos[{i}] must be a list of frames, got {type(frames).__name__}")
            where = "videos[{}][{}]"
            images.append([_decode(_b64(f, where.format(i, j)), where.format(i, j)) for j, f in enumerate(frames)])
    else:
        items = _list(request, "images", None)
        images = [_decode(_b64(item, f"images[{i}]"), f"images[{i}]") for i, item in enumerate(items)]
    prompts = _list(request, "prompts", len(images)) or [""] * len(images)
    metadata = _list(request, "metadata", len(images)) or [{} for _ in images]
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise RequestError(400, "'prompts' must be strings")
    if not all(isinstance(row, dict) for row in metadata):
        raise RequestError(400, "'metadata' must be JSON objects")
    return images, prompts, metadata


def _parse_pickle_request(body: bytes) -> tuple[list, list[str], list[dict]]:
    request = pickle.loads(body)  # only with allow_pickle: runs whatever code the request holds
    if "videos" in request:  # one list of JPEG frames per video
        images = [[_decode(data) for data in frames] for frames in request["videos"]]
    else:
        images = [_decode(data) for data in request["images"]]
    prompts = list(request.get("prompts") or [""] * len(images))
    metadata = list(request.get("meta_datas") or [{} for _ in images])
    return images, prompts, metadata


def json_default(value: Any) -> Any:
    """numpy / torch numbers and arrays as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"a {type(value).__name__} is not JSON serialisable")


def make_handler(
    score: ScoreFunction,
    lock: threading.Lock | None = None,
    allow_pickle: bool = False,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> type[BaseHTTPRequestHandler]:
    """A request handler class that scores each POSTed batch with `score` (one batch at a time under `lock`): a list
    of PIL images, or of videos (lists of PIL frames) when the request has `videos`.

    Requests are JSON (protocol version 1, see the module docstring) of at most `max_request_bytes`. With
    `allow_pickle`, a request whose `Content-Type` is not JSON is unpickled (Flow-GRPO's protocol): that lets anyone
    who reaches the port run code in this process.
    """
    lock = lock or threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        timeout = 120  # seconds a client may take to send its request: a stalled one frees its thread

        def _body(self) -> bytes:
            header = self.headers.get("Content-Length")
            if header is None:
                raise RequestError(411, "the request has no Content-Length")
            try:
                length = int(header)
            except ValueError:
                raise RequestError(400, f"Content-Length {header[:40]!r} is not a number") from None
            if length < 0:
                raise RequestError(400, f"Content-Length {length} is negative")
            if length > max_request_bytes:
                self._drain(length)
                raise RequestError(
                    413,
                    f"the request of {length} bytes exceeds this server's limit of {max_request_bytes} bytes "
                    "(send smaller batches, or start the server with a larger --max-request-mb)",
                )
            body = self.rfile.read(length)
            if len(body) != length:
                raise RequestError(400, f"the body has {len(body)} of its {length} bytes")
            return body

        def _drain(self, length: int) -> None:
            # Read and drop the refused body in small chunks (no memory held), so the client, still sending, gets
            # the 413 rather than a reset connection; the connection is closed afterwards.
            self.close_connection = True
            try:
                while length > 0:
                    chunk = self.rfile.read(min(length, 1 << 20))
                    if not chunk:
                        break
                    length -= len(chunk)
            except OSError:
                pass

        def do_POST(self):
            pickled = allow_pickle and not self.headers.get("Content-Type", "").startswith(JSON_TYPE)
            try:
                body = self._body()
                parse = _parse_pickle_request if pickled else parse_json_request
                images, prompts, metadata = parse(body)
            except RequestError as error:
                return self._refuse(error.status, error.message, pickled)
            except Exception as error:  # a pickle request (allow_pickle) that does not decode
                return self._refuse(400, f"a malformed request ({type(error).__name__}: {error})", pickled)
            try:
                with lock:
                    result = _response(score(images, prompts, metadata), len(images))
                if pickled:
                    body = pickle.dumps(result)
                else:
                    body = json.dumps({**result, "version": PROTOCOL_VERSION}, default=json_default).encode("utf-8")
            except Exception as error:
                trace = traceback.format_exc()
                last = trace.strip().splitlines()[-1] if trace.strip() else repr(error)
                logger.error("HTTP 500 to %s: the scorer failed: %s", self.client_address[0], last)
                if pickled:  # Flow-GRPO's clients read the traceback as text
                    return self._send(500, trace.encode("utf-8"), "text/plain")
                return self._send_json(500, {"error": last, "traceback": trace})
            self._send(200, body, "application/octet-stream" if pickled else JSON_TYPE)

        def _refuse(self, status: int, message: str, pickled: bool) -> None:
            message = " ".join(message.split())  # one log line, one error line
            logger.warning("HTTP %d to %s: %s", status, self.client_address[0], message)
            if pickled:
                return self._send(status, message.encode("utf-8"), "text/plain")
            self._send_json(status, {"error": message, "supported_versions": list(SUPPORTED_VERSIONS)})

        def _send_json(self, status: int, payload: dict) -> None:
            body = json.dumps({"version": PROTOCOL_VERSION, **payload}).encode("utf-8")
            self._send(status, body, JSON_TYPE)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # quiet per request; refusals and failures log one line each above
            pass

    return Handler


def serve(
    score: ScoreFunction,
    host: str = "127.0.0.1",
    port: int = 18085,
    allow_pickle: bool = False,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> ThreadingHTTPServer:
    """Start serving `score` in a background thread; returns the server (`server.server_address`, `shutdown()`).

    `host` defaults to loopback. `port=0` picks a free port. Requests are JSON (protocol version 1) of at most
    `max_request_bytes`; `allow_pickle=True` also takes Flow-GRPO's pickled requests, which lets whoever reaches the
    port run code in this process.
    """
    handler = make_handler(score, allow_pickle=allow_pickle, max_request_bytes=max_request_bytes)
    server = ThreadingHTTPServer((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def _load(spec: str) -> ScoreFunction:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--scorer must be 'module:function', got {spec!r}")
    sys.path.insert(0, ".")
    return getattr(importlib.import_module(module), name)


def make_parser() -> argparse.ArgumentParser:
    """The command line of `main`: `--scorer module:function`, `--host` (127.0.0.1), `--port`, `--max-request-mb`,
    `--allow-pickle`."""
    parser = argparse.ArgumentParser(description="Serve a reward function over HTTP (JSON protocol version 1).")
    parser.add_argument("--scorer", required=True, help="module:function with signature (images, prompts, metadata)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on (default 127.0.0.1, this machine only); the traffic is plain HTTP.",
    )
    parser.add_argument("--port", type=int, default=18085)
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
        help="Largest request body in MiB (default 256); larger ones are answered 413 before they are read.",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="Also take Flow-GRPO's pickled requests (any Content-Type but application/json). UNSAFE: unpickling "
        "runs code, so whoever reaches the port can run any command as this server's user.",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    score = _load(args.scorer)
    handler = make_handler(score, allow_pickle=args.allow_pickle, max_request_bytes=int(args.max_request_mb * 2**20))
    server = ThreadingHTTPServer((args.host, args.port), handler)
    if args.allow_pickle:
        logger.warning("--allow-pickle: pickled requests are unpickled; whoever reaches this port can run code here")
    print(f"Serving {args.scorer} on http://{args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
