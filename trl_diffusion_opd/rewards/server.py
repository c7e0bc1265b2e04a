"""A reward server speaking Flow-GRPO's protocol, so heavy reward models run in their own environment.

Protocol (Flow-GRPO's `reward-server`, after ddpo-pytorch's LLaVA server): the client POSTs to `/` a pickled dict
`{"images": [JPEG bytes, ...], "prompts": [...], "meta_datas": [row dicts], "only_strict": bool}`; the server answers
200 with a pickled dict of per-image lists (`{"outputs": [...]}`, or GenEval's `{"scores", "rewards",
"strict_rewards", "group_rewards", "group_strict_rewards"}`), or 500 with the traceback as text. A request for a
video scorer has `"videos": [[JPEG bytes of each frame], ...]` instead of `"images"`; the scorer then receives one
list of PIL frames per video and returns one score per video.

Security: pickle runs code when loaded. This server unpickles every request, so anyone who can reach its port can run
any command as the server's user. It therefore listens on 127.0.0.1 (this machine only) unless `--host` / `host`
says otherwise; `--host 0.0.0.0` or a public address exposes it to every machine that can reach the port. Across
machines use an SSH tunnel or a private network you trust. Clients unpickle the answers too (see
`trl_diffusion_opd.rewards.remote`): point them only at servers you run.

This file needs only the standard library and Pillow, so it runs in the reward model's own environment; copy it there
and serve any function `score(images, prompts, metadata) -> list[float]` (or a dict of lists):

```bash
python server.py --scorer my_scorer:score --port 18088
```
"""

from __future__ import annotations

import argparse
import importlib
import io
import pickle
import sys
import threading
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


ScoreFunction = Callable[[list, list, list], Any]


def _response(result: Any, count: int) -> dict:
    if isinstance(result, dict):
        return result
    scores = [float(value) for value in result]
    if len(scores) != count:
        raise ValueError(f"the scorer returned {len(scores)} scores for {count} images")
    return {"outputs": scores, "scores": scores}


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=["JPEG"]).convert("RGB")


def make_handler(score: ScoreFunction, lock: threading.Lock | None = None) -> type[BaseHTTPRequestHandler]:
    """A request handler class that scores each POSTed batch with `score` (one batch at a time under `lock`): a list
    of PIL images, or of videos (lists of PIL frames) when the request has `videos`."""
    lock = lock or threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length", 0))
                request = pickle.loads(self.rfile.read(length))
                if "videos" in request:  # one list of JPEG frames per video
                    images = [[_decode(data) for data in frames] for frames in request["videos"]]
                else:
                    images = [_decode(data) for data in request["images"]]
                prompts = list(request.get("prompts") or [""] * len(images))
                metadata = list(request.get("meta_datas") or [{} for _ in images])
                with lock:
                    body = pickle.dumps(_response(score(images, prompts, metadata), len(images)))
                status = 200
            except Exception:
                body = traceback.format_exc().encode("utf-8")
                status = 500
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if status == 200 else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # quiet by default; errors come back to the client
            pass

    return Handler


def serve(score: ScoreFunction, host: str = "127.0.0.1", port: int = 18085) -> ThreadingHTTPServer:
    """Start serving `score` in a background thread; returns the server (`server.server_address`, `shutdown()`).

    `host` defaults to loopback: any other address lets whoever reaches the port run code here (the requests are
    pickles). `port=0` picks a free port.
    """
    server = ThreadingHTTPServer((host, port), make_handler(score))
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
    """The command line of `main`: `--scorer module:function`, `--host` (127.0.0.1), `--port`."""
    parser = argparse.ArgumentParser(description="Serve a reward function over HTTP (Flow-GRPO's protocol).")
    parser.add_argument("--scorer", required=True, help="module:function with signature (images, prompts, metadata)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on (default 127.0.0.1, this machine only). Requests are pickles: any address other "
        "machines can reach lets them run code as this server's user.",
    )
    parser.add_argument("--port", type=int, default=18085)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    score = _load(args.scorer)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(score))
    print(f"Serving {args.scorer} on http://{args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
