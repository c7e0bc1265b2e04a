"""Rewards: the registry, OCR on rendered text, CLIP-based rewards on tiny random models from a local Hub cache, the
reward-server client against a local server, and the rule-based rewards."""

import base64
import http.client
import http.server
import io
import json
import logging
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from PIL import Image, ImageDraw, ImageFont

from trl_diffusion_opd import rewards
from trl_diffusion_opd.rewards import (
    RemoteReward,
    RewardServerError,
    as_reward,
    get_reward,
    levenshtein,
    ocr_target,
    text_similarity,
)
from trl_diffusion_opd.rewards.server import make_parser, serve
from trl_diffusion_opd.testing import get_tiny_clip_tokenizer, save_to_hub_cache


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_rewards():
    yield
    rewards.clear_reward_cache()


# ---------------------------------------------------------------------------------------------- registry
def test_registry_names_lookup_and_loaded_once():
    names = rewards.reward_names()
    for name in ["ocr", "clipscore", "pickscore", "aesthetic", "geneval", "unifiedreward", "hpsv2", "imagereward"]:
        assert name in names
    for name in ["brightness", "saturation", "jpeg_compressibility"]:
        assert name in names
    assert get_reward("brightness") is get_reward("brightness")  # loaded once per arguments
    assert get_reward("jpeg_compressibility", quality=80) is not get_reward("jpeg_compressibility", quality=90)
    with pytest.raises(ValueError, match="Unknown reward 'nope'; available rewards: aesthetic, brightness"):
        get_reward("nope")


def test_one_parser_reads_every_form_of_a_reward_spec():
    reward = rewards.get_reward("brightness")
    assert rewards.parse_reward_spec(None) == []
    assert rewards.parse_reward_spec(" ocr, brightness ,") == ["ocr", "brightness"]
    assert rewards.parse_reward_spec('["ocr"]') == ["ocr"]
    assert rewards.parse_reward_spec(reward) == [reward]
    assert rewards.parse_reward_spec('{"a": "ocr,brightness", "b": null}') == {"a": ["ocr", "brightness"], "b": []}
    with pytest.raises(ValueError, match=r"^`eval_rewards` is not valid JSON \(Expecting"):
        rewards.parse_reward_spec("{bad", "eval_rewards")
    with pytest.raises(ValueError, match=r"^`x\['a'\]` must be a reward name or a list of them, got 3\.$"):
        rewards.parse_reward_spec({"a": 3}, "x")
    with pytest.raises(ValueError, match=r"^`x` must be None, 'a,b', a list of reward names or .*, got int: 3\.$"):
        rewards.parse_reward_spec(3, "x")


def test_function_reward_is_batched_and_checked():
    calls = []

    def count_pixels(images, prompts, metadata):
        calls.append(len(images))
        return [
            image.width * image.height + len(p) + row.get("bonus", 0)
            for image, p, row in zip(images, prompts, metadata)
        ]

    reward = as_reward(count_pixels, batch_size=2)
    images = [Image.new("RGB", (4, 4))] * 5
    scores = reward(images, ["ab"] * 5, [{"bonus": i} for i in range(5)])
    assert scores == [18.0, 19.0, 20.0, 21.0, 22.0] and calls == [2, 2, 1]
    assert reward.name == "count_pixels"
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        reward(images, ["a"] * 4)
    short = as_reward(lambda images, prompts, metadata: [1.0], name="short")
    with pytest.raises(RuntimeError, match="Reward 'short' returned 1 scores for 5 images"):
        short(images)


def test_rule_based_rewards_on_known_images():
    black, white = Image.new("RGB", (16, 16), "black"), Image.new("RGB", (16, 16), "white")
    gray, red = Image.new("RGB", (16, 16), (128, 128, 128)), Image.new("RGB", (16, 16), (255, 0, 0))
    noise = Image.effect_noise((64, 64), 100).convert("RGB")
    assert get_reward("brightness")([black, white, gray]) == pytest.approx([0.0, 1.0, 128 / 255])
    assert get_reward("saturation")([gray, red, white]) == pytest.approx([0.0, 1.0, 0.0])
    flat, noisy = get_reward("jpeg_compressibility")([Image.new("RGB", (64, 64), "teal"), noise])
    assert 0.9 < flat < 1.0 and noisy < flat - 0.3


# ---------------------------------------------------------------------------------------------- OCR
def test_ocr_target_distance_and_similarity():
    assert ocr_target('A sign that says "Open 24h" and "closed"') == "Open 24h"  # the first pair
    assert ocr_target("a “curly” quote") == "curly"
    assert ocr_target("no quotes at all") is None
    assert ocr_target('empty "" quotes') is None
    assert ocr_target('an "unclosed quote') is None
    assert ocr_target("no quotes", {"ocr_text": "meta"}) == "meta"
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert text_similarity("Hello World", "hello world") == 1.0  # case and spaces do not count
    assert text_similarity("xx HELLO WORLD yy", "Hello World") == 1.0  # a substring is a match
    assert text_similarity("hallo", "hello") == pytest.approx(0.8)
    assert text_similarity("", "hello") == 0.0
    assert text_similarity("completely different and much longer", "abc") == 0.0  # the distance is capped


def test_ocr_reward_with_a_given_engine_and_missing_text_policies():
    engine = lambda image: [("Hello", 0.99), ("Wrld", 0.2)]  # noqa: E731
    reward = rewards.OCRReward(engine=engine)
    image = Image.new("RGB", (8, 8))
    scores = reward([image] * 3, ['"hello wrld"', 'say "hello"', "no quotes"])
    assert scores[:2] == [1.0, 1.0] and math.isnan(scores[2])
    assert rewards.OCRReward(engine=engine, min_confidence=0.5)([image], ['"hello wrld"']) == [pytest.approx(5 / 9)]
    assert rewards.OCRReward(engine=engine, on_missing_text=0.0)([image], ["no quotes"]) == [0.0]
    with pytest.raises(ValueError, match="has no text in double quotes"):
        rewards.OCRReward(engine=engine, on_missing_text="error")([image], ["no quotes"])


def _font(size: int):
    """DejaVu Sans where the system or matplotlib has it, else Pillow's embedded FreeType font."""
    candidates = ["DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
    if shutil.which("fc-match"):
        found = subprocess.run(["fc-match", "-f", "%{file}", "DejaVu Sans"], capture_output=True, text=True)
        candidates.append(found.stdout.strip())
    try:
        import matplotlib

        candidates.append(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"))
    except ImportError:
        pass
    for candidate in candidates:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        pytest.skip("No TrueType font: neither DejaVu Sans nor Pillow's embedded font (Pillow without FreeType).")
    return font


def _text_image(text: str) -> Image.Image:
    image = Image.new("RGB", (512, 160), "white")
    ImageDraw.Draw(image).text((24, 50), text, fill="black", font=_font(48))
    return image


def test_ocr_on_rendered_text():
    pytest.importorskip(
        "rapidocr_onnxruntime", reason="the OCR reward needs rapidocr-onnxruntime: pip install '.[ocr]'"
    )
    torch.set_num_threads(1)
    reward = get_reward("ocr")
    images = [_text_image("Hello World"), _text_image("Diffusion OPD"), _text_image("Hello World")]
    prompts = [
        'A neon sign that says "hello world"',
        'A poster with the words "Diffusion OPD"',
        'A mug "Good morning"',
    ]
    matching_1, matching_2, wrong = reward(images, prompts)
    assert matching_1 >= 0.9 and matching_2 >= 0.9
    assert wrong <= 0.3
    # The known pitfall: the whole prompt as the target scores a perfect rendering far lower.
    recognized = reward.recognize(images[0])
    assert text_similarity(recognized, prompts[0]) < 0.6 < text_similarity(recognized, "hello world")
    assert math.isnan(reward([images[0]], ["a sign without quoted text"])[0])


# ---------------------------------------------------------------------------------------------- CLIP-based rewards
@pytest.fixture
def clip_cache(tmp_path, monkeypatch):
    """Tiny random CLIP models (and an aesthetic MLP) under the real ids, in a local Hub cache, with the Hub offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = get_tiny_clip_tokenizer()
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**layers, "vocab_size": len(tokenizer), "max_position_embeddings": 77}
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = {**layers, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    size = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(**size), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    cache = tmp_path / "hub"
    for repo in [
        "openai/clip-vit-large-patch14",
        "yuvalkirstain/PickScore_v1",
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ]:
        save_to_hub_cache(tmp_path / "clip", repo, cache)
    # The LAION predictor's layout (Linear 768-1024-128-64-16-1 at layers 0, 2, 4, 6, 7), on the 16-d embedding.
    sizes = [(16, 32), (32, 8), (8, 8), (8, 4), (4, 1)]
    mlp = {}
    for index, (n_in, n_out) in zip([0, 2, 4, 6, 7], sizes):
        mlp[f"layers.{index}.weight"] = torch.randn(n_out, n_in)
        mlp[f"layers.{index}.bias"] = torch.randn(n_out)
    (tmp_path / "aes").mkdir()
    torch.save(mlp, tmp_path / "aes" / "aesthetic-model.pth")
    save_to_hub_cache(tmp_path / "aes", "trl-lib/ddpo-aesthetic-predictor", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return {"cache_dir": str(cache), "model": model, "mlp": mlp}


def _images():
    return [
        Image.new("RGB", (64, 48), (200, 20, 20)),
        Image.new("RGB", (40, 40), (10, 90, 220)),
        Image.radial_gradient("L").resize((32, 32)).convert("RGB"),
    ]


PROMPTS = ["a red square", "a blue sky", "a grey disc"]


def test_transformers_rewards_on_tiny_models_from_the_hub_cache(clip_cache):
    kwargs = {"cache_dir": clip_cache["cache_dir"], "device": "cpu"}
    scores = {name: get_reward(name, **kwargs)(_images(), PROMPTS) for name in ["clipscore", "pickscore", "aesthetic"]}
    for name, values in scores.items():
        assert len(values) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in values), name
    assert all(-1.0 <= v <= 1.0 for v in scores["clipscore"])
    # Same tiny CLIP under both ids: PickScore is the raw logit-scale score, logit_scale.exp() x cosine.
    scale = clip_cache["model"].logit_scale.exp().item()
    assert scores["pickscore"] == pytest.approx([scale * v for v in scores["clipscore"]], rel=1e-4)
    # Aesthetic: the MLP on the normalised image embedding.
    reward = get_reward("aesthetic", **kwargs)
    with torch.no_grad():
        embeds = reward._image_embeds(_images())
        expected = embeds
        for index in [0, 2, 4, 6, 7]:
            expected = (
                expected @ clip_cache["mlp"][f"layers.{index}.weight"].T + clip_cache["mlp"][f"layers.{index}.bias"]
            )
    assert scores["aesthetic"] == pytest.approx(expected.squeeze(-1).tolist(), rel=1e-4)
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(3))
    # Batching does not change the scores.
    assert get_reward("pickscore", batch_size=1, **kwargs)(_images(), PROMPTS) == pytest.approx(scores["pickscore"])


def test_missing_model_names_the_repo(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="Reward 'clipscore': could not load model 'org/not-cached'"):
        get_reward("clipscore", model_id="org/not-cached", cache_dir=str(tmp_path), device="cpu")


# ---------------------------------------------------------------------------------------------- videos
def _video(seed: int, frames: int = 4, size: int = 32) -> list[Image.Image]:
    """`frames` distinct random frames (a video whose frames really differ)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(frames)]


def test_image_rewards_score_a_video_as_the_mean_of_its_frames(clip_cache):
    """Any image reward scores videos (lists of PIL frames, (F, H, W, C) arrays, (F, C, H, W) tensors, or a whole
    (B, F, C, H, W) batch) as the mean of its frames' scores, each frame scored on its own with the video's prompt."""
    kwargs = {"cache_dir": clip_cache["cache_dir"], "device": "cpu"}
    videos = [_video(0), _video(1, frames=3)]
    prompts = ["a red square", "a blue sky"]
    for name in ["clipscore", "aesthetic", "brightness"]:
        reward = get_reward(name, **kwargs) if name != "brightness" else get_reward(name)
        expected = [
            float(np.mean([reward([frame], [prompt])[0] for frame in video])) for video, prompt in zip(videos, prompts)
        ]
        assert reward(videos, prompts) == pytest.approx(expected, rel=1e-5, abs=1e-6), name
        assert expected[0] != pytest.approx(reward([videos[0][0]], prompts[:1])[0], abs=1e-4), name  # frames differ
        # The same videos as an array (floats in [0, 1]) and as a tensor (channels first).
        array = np.stack([np.asarray(frame) for frame in videos[0]]).astype(np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
        assert reward([array, tensor], prompts[:1] * 2) == pytest.approx([expected[0]] * 2, rel=1e-5, abs=1e-6), name
        assert reward(tensor[None].repeat(2, 1, 1, 1, 1), prompts[:1] * 2) == pytest.approx(
            [expected[0]] * 2, rel=1e-5, abs=1e-6
        )
    # Frames without a score (nan) are skipped; a video with none has none.
    half = as_reward(lambda images, p, m: [math.nan if image.getpixel((0, 0))[0] < 128 else 1.0 for image in images])
    dark, light = Image.new("RGB", (8, 8), "black"), Image.new("RGB", (8, 8), "white")
    scores = half([[dark, light, light], [dark, dark]])
    assert scores[0] == 1.0 and math.isnan(scores[1])
    # Images and videos in one call: an image is scored as itself.
    assert get_reward("brightness")([white := Image.new("RGB", (8, 8), "white"), [dark, white]]) == [1.0, 0.5]


def test_temporal_consistency_of_videos(clip_cache):
    reward = get_reward("temporal_consistency", cache_dir=clip_cache["cache_dir"], device="cpu", frame_batch_size=3)
    assert reward.accepts_video and reward.name == "temporal_consistency"
    frame = _video(5, frames=1)[0]
    noise = _video(6, frames=6)
    still, noisy, single = reward([[frame] * 6, noise, frame])
    assert still == pytest.approx(1.0, abs=1e-6)  # every adjacent pair has the same embedding
    assert math.isnan(single)  # one image has no adjacent frames
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(reward._image_embeds(noise).double(), dim=-1)
    assert noisy == pytest.approx((embeds[:-1] * embeds[1:]).sum(-1).mean().item(), abs=1e-6)
    assert noisy < still - 1e-3
    # Interleaving the still video with noise frames lowers it too; the order of the frames matters.
    mixed = [frame, noise[0], frame, noise[1], frame, noise[2]]
    assert reward([mixed])[0] < still - 1e-3
    ordered = [frame, frame, frame, noise[0], noise[0], noise[0]]
    assert reward([ordered])[0] > reward([mixed])[0]


# ---------------------------------------------------------------------------------------------- reward server
def _brightness_and_metadata(images, prompts, metadata):
    return {
        "outputs": [float(np.asarray(image.convert("L")).mean()) / 255.0 for image in images],
        "lengths": [len(p) for p in prompts],
        "tags": [row.get("tag") for row in metadata],
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_remote_reward_round_trip_against_a_local_server():
    requests = []

    def score(images, prompts, metadata):
        requests.append(len(images))
        return _brightness_and_metadata(images, prompts, metadata)

    server = serve(score, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        images = [Image.new("RGB", (32, 32), (v, v, v)) for v in (0, 64, 128, 200, 255)]
        reward = RemoteReward(url, batch_size=2, name="brightness_server")
        scores = reward(images, ["a", "bb", "ccc", "dddd", "eeeee"], [{"tag": i} for i in range(5)])
        assert scores == pytest.approx([0, 64 / 255, 128 / 255, 200 / 255, 1.0], abs=1e-6)  # PNG is lossless
        assert requests == [2, 2, 1]
        assert RemoteReward(url, score_key="lengths")(images, ["a", "bb", "ccc", "dddd", "eeeee"]) == [1, 2, 3, 4, 5]
        assert RemoteReward(url, score_key="tags")(images[:2], None, [{"tag": 7}, {"tag": 8}]) == [7.0, 8.0]
        with pytest.raises(RewardServerError, match="no 'nope'"):
            RemoteReward(url, score_key="nope")(images[:1])
    finally:
        server.shutdown()
        server.server_close()


def test_remote_reward_sends_videos_or_their_frames():
    """`send_videos=True`: one request field `videos` of JPEG frames per video, one score per video back; the default
    sends the frames as images to an image server and averages their scores."""
    requests = []

    def score(samples, prompts, metadata):
        requests.append([len(s) if isinstance(s, list) else "image" for s in samples])
        if isinstance(samples[0], list):  # a video server: mean brightness of the first frame + frames / 100
            return [np.asarray(v[0].convert("L")).mean() / 255.0 + len(v) / 100 for v in samples]
        return [float(np.asarray(image.convert("L")).mean()) / 255.0 for image in samples]

    server = serve(score, port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        gray = [Image.new("RGB", (16, 16), (v, v, v)) for v in (0, 100, 200)]
        videos = [gray, gray[:2], [gray[2]] * 5]
        as_videos = RemoteReward(url, batch_size=2, send_videos=True)(videos, ["a", "b", "c"])
        assert as_videos == pytest.approx([0.03, 0.02, 200 / 255 + 0.05], abs=1e-6)  # PNG frames, lossless
        assert requests == [[3, 2], [5]]
        requests.clear()
        as_frames = get_reward("hpsv2", url=url, batch_size=4)(videos, ["a", "b", "c"])
        assert as_frames == pytest.approx([100 / 255, 50 / 255, 200 / 255], abs=1e-6)
        assert requests == [["image"] * 4] * 2 + [["image"] * 2]  # 10 frames in batches of 4
        with pytest.raises(ValueError, match="mixes images and videos"):
            RemoteReward(url, send_videos=True)([gray[0], gray])
    finally:
        server.shutdown()
        server.server_close()


def test_geneval_client_speaks_json_and_flow_grpo_pickle_when_asked():
    """JSON against the package's server by default; `protocol="pickle"` against a server started with
    `allow_pickle` speaks Flow-GRPO's reward-server protocol (JPEG images, `meta_datas`, `only_strict`)."""
    seen = {}

    def geneval(images, prompts, metadata):
        seen["metadata"] = metadata
        return {
            "scores": [0.5] * len(images),
            "rewards": [0.5] * len(images),
            "strict_rewards": [float(row["include"][0]["count"] == 2) for row in metadata],
            "group_rewards": {},
            "group_strict_rewards": {},
        }

    server = serve(geneval, port=0, allow_pickle=True)
    try:
        rows = [
            {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
            {"tag": "counting", "include": [{"class": "dog", "count": 3}], "prompt": "a photo of three dogs"},
        ]
        images = [Image.new("RGB", (16, 16))] * 2
        url = f"127.0.0.1:{server.server_address[1]}"
        for protocol in ("json", "pickle"):
            seen.clear()
            reward = get_reward("geneval", url=url, protocol=protocol)
            assert reward.image_format == ("png" if protocol == "json" else "jpeg")
            assert reward(images, [r["prompt"] for r in rows], rows) == [1.0, 0.0]  # strict per-image correctness
            assert seen["metadata"] == rows
            scores = get_reward("geneval", url=url, score_key="scores", protocol=protocol)(images, None, rows)
            assert scores == [0.5, 0.5]
    finally:
        server.shutdown()
        server.server_close()


def test_remote_reward_reports_a_down_server_and_server_errors():
    port = _free_port()
    reward = RemoteReward(f"http://127.0.0.1:{port}", retries=1, backoff=0.01, name="unifiedreward")
    start = time.perf_counter()
    with pytest.raises(
        RewardServerError, match=rf"'unifiedreward': no reward server answers at http://127.0.0.1:{port}"
    ):
        reward([Image.new("RGB", (8, 8))], ["a"])
    assert time.perf_counter() - start < 10

    def broken(images, prompts, metadata):
        raise ValueError("the detector crashed")

    server = serve(broken, port=0)
    try:
        reward = RemoteReward(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(RewardServerError, match="HTTP 500: ValueError: the detector crashed"):
            reward([Image.new("RGB", (8, 8))], ["a"])
    finally:
        server.shutdown()
        server.server_close()


def test_server_file_runs_standalone_without_this_package(tmp_path):
    """`server.py` is copied into a reward model's environment: it must run as a script on stdlib + Pillow."""
    shutil.copy(ROOT / "trl_diffusion_opd" / "rewards" / "server.py", tmp_path / "server.py")
    (tmp_path / "my_scorer.py").write_text(
        textwrap.dedent(
            """
            import sys
            def score(images, prompts, metadata):
                assert "torch" not in sys.modules and "trl_diffusion_opd" not in sys.modules
                return [float(image.width) for image in images]
            """
        )
    )
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen(
        [sys.executable, "server.py", "--scorer", "my_scorer:score", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        reward = RemoteReward(f"http://127.0.0.1:{port}", retries=20, backoff=0.1)
        assert reward([Image.new("RGB", (24, 8)), Image.new("RGB", (12, 8))], ["a", "b"]) == [24.0, 12.0]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_jpeg_payload_matches_flow_grpo_clients():
    from trl_diffusion_opd.rewards.remote import jpeg_bytes

    image = Image.effect_noise((32, 32), 40).convert("RGB")
    default = io.BytesIO()
    image.save(default, format="JPEG")
    assert jpeg_bytes(image) == default.getvalue()  # Pillow's default quality, as Flow-GRPO's clients send
    assert Image.open(io.BytesIO(jpeg_bytes(image, quality=95))).format == "JPEG"


# ---------------------------------------------------------------------------------------------- reward server safety
class _Exploit:
    """Unpickling this calls `exec`, which writes `marker`: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _b64_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _raw_post(port, body: bytes | None, content_type="application/json"):
    """POST `body` as it is (no client-side checks); returns (status, parsed JSON answer)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("POST", "/")
        connection.putheader("Content-Type", content_type)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        if body is not None:
            connection.send(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_server_refuses_bad_requests_with_one_log_line_each_and_keeps_serving(tmp_path, caplog):
    calls = []

    def score(images, prompts, metadata):
        calls.append(len(images))
        return [float(image.width) for image in images]

    marker = tmp_path / "ran"
    png = _b64_png(Image.new("RGB", (8, 8)))
    bad = [
        (b"x" * 5000, 413, "the request of 5000 bytes exceeds this server's limit of 4096 bytes"),
        (None, 411, "the request has no Content-Length"),
        (b"{not json", 400, "the body is not JSON (JSONDecodeError"),
        (b"[1, 2]", 400, "the body must be a JSON object, got list"),
        (json.dumps({"version": 2, "images": [png]}).encode(), 400, "unsupported protocol version 2; supported"),
        (json.dumps({"images": [png]}).encode(), 400, "unsupported protocol version None; supported versions: 1"),
        (json.dumps({"version": 1}).encode(), 400, "the request needs exactly one of 'images' and 'videos'"),
        (json.dumps({"version": 1, "images": ["%%%"]}).encode(), 400, "images[0] is not valid base64"),
        (json.dumps({"version": 1, "images": ["aGVsbG8="]}).encode(), 400, "images[0] is not a PNG or JPEG image"),
        (json.dumps({"version": 1, "videos": [[png, 3]]}).encode(), 400, "videos[0][1] must be a base64 string"),
        (json.dumps({"version": 1, "images": [png], "prompts": ["a", "b"]}).encode(), 400, "'prompts' has 2 entries"),
        # what Flow-GRPO's clients send: a pickle, not declared as JSON
        (pickle.dumps({"images": [b""], "payload": _Exploit(marker)}), 400, "a pickle request, refused", "octet"),
    ]
    server = serve(score, port=0, max_request_bytes=4096)
    port = server.server_address[1]
    try:
        with caplog.at_level(logging.INFO, logger="trl_diffusion_opd.reward_server"):
            for body, status, message, *octet in bad:
                answer = _raw_post(port, body, "application/octet-stream" if octet else "application/json")
                assert answer[0] == status, (message, answer)
                assert answer[1]["error"].startswith(message), answer[1]
                assert answer[1]["version"] == 1 and answer[1]["supported_versions"] == [1]
            # a good request after the bad ones, on the same server
            good = json.dumps({"version": 1, "images": [png, _b64_png(Image.new("RGB", (5, 3)))]}).encode()
            status, answer = _raw_post(port, good)
        assert (status, answer) == (200, {"version": 1, "outputs": [8.0, 5.0], "scores": [8.0, 5.0]})
    finally:
        server.shutdown()
        server.server_close()
    assert not marker.exists()  # the pickle was never loaded
    assert calls == [2]  # the scorer saw only the good request
    lines = [record.getMessage() for record in caplog.records if record.name == "trl_diffusion_opd.reward_server"]
    assert len(lines) == len(bad)  # one log line per refused request, none for the good one
    assert all("\n" not in line for line in lines)
    assert [line.split()[1] for line in lines] == [str(status) for _, status, *_ in bad]


class _AnswerServer(http.server.BaseHTTPRequestHandler):
    """A fake reward server: answers every POST with the bytes in `self.server.answer`."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.server.answer)))
        self.end_headers()
        self.wfile.write(self.server.answer)

    def log_message(self, format, *args):
        pass


def test_client_refuses_a_pickled_answer_unless_asked_for_pickle(tmp_path):
    marker = tmp_path / "ran"
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswerServer)
    fake.answer = pickle.dumps({"outputs": [1.0], "payload": _Exploit(marker)})
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{fake.server_address[1]}"
    try:
        with pytest.raises(RewardServerError, match=r"that are not JSON \(a pickle, refused unread"):
            RemoteReward(url)([Image.new("RGB", (8, 8))])
        assert not marker.exists()
        # the payload is real: the explicit opt-in for Flow-GRPO's servers does unpickle it
        assert RemoteReward(url, protocol="pickle")([Image.new("RGB", (8, 8))]) == [1.0]
        assert marker.read_text() == "pwned"
    finally:
        fake.shutdown()
        fake.server_close()


def test_pickle_is_opt_in_on_both_sides():
    assert make_parser().parse_args(["--scorer", "m:f"]).allow_pickle is False
    assert make_parser().parse_args(["--scorer", "m:f", "--allow-pickle"]).allow_pickle is True
    assert RemoteReward("127.0.0.1:1").protocol == "json"
    with pytest.raises(ValueError, match="`protocol` must be 'json' or 'pickle', got 'yaml'"):
        RemoteReward("127.0.0.1:1", protocol="yaml")
    with pytest.raises(ValueError, match=r"may not set the protocol's own fields \['version'\]"):
        RemoteReward("127.0.0.1:1", extra={"version": 2})
    server = serve(lambda images, prompts, metadata: [1.0] * len(images), port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(RewardServerError, match="HTTP 400: a pickle request, refused: this server speaks JSON"):
            RemoteReward(url, protocol="pickle")([Image.new("RGB", (8, 8))])
        assert RemoteReward(url)([Image.new("RGB", (8, 8))]) == [1.0]
    finally:
        server.shutdown()
        server.server_close()


def test_client_splits_a_batch_at_max_request_bytes_and_reports_the_servers_limit():
    batches = []

    def score(images, prompts, metadata):
        batches.append(len(images))
        return [float(np.asarray(image)[0, 0, 0]) for image in images]

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    one = len(json.dumps({"version": 1, "images": [_b64_png(images[0])], "prompts": [""], "metadata": [{}]}))
    server = serve(score, port=0, max_request_bytes=int(2.5 * one))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        expected = [float(np.asarray(image)[0, 0, 0]) for image in images]
        assert RemoteReward(url, max_request_bytes=int(2.5 * one))(images) == expected
        assert batches == [2, 2, 1]  # one batch of 5 (batch_size 64) in three requests under the limit
        with pytest.raises(RewardServerError, match=r"one image makes a request of \d+ bytes, more than"):
            RemoteReward(url, max_request_bytes=one // 2)(images[:1])
        # a client allowed more than the server: the server's 413 comes back as one line
        with pytest.raises(RewardServerError, match=r"HTTP 413: the request of \d+ bytes exceeds this server's limit"):
            RemoteReward(url)(images)
        assert batches == [2, 2, 1]
    finally:
        server.shutdown()
        server.server_close()
