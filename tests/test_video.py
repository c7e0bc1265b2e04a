"""Video outputs: sample videos (animated WebP / GIF through Pillow, MP4 through diffusers' `export_to_video`), frame
grids, the `eval` command and the training-time samples on the tiny Wan pipeline, and the model card showing a
video."""

import numpy as np
import pytest
import torch
from PIL import Image

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer, RewardEvalCallback
from trl_diffusion_opd.figures import frame_grid, frame_indices, save_video
from trl_diffusion_opd.hub import create_model_card
from trl_diffusion_opd.rewards import get_reward
from trl_diffusion_opd.scripts import eval as eval_script
from trl_diffusion_opd.testing import TINY_WAN_FRAMES, TINY_WAN_RESOLUTION, get_tiny_wan_pipeline, save_toy_lora


def _frames(count: int = 5, size: tuple[int, int] = (24, 16)) -> list[Image.Image]:
    """Frames of distinct flat colours."""
    return [Image.new("RGB", size, (40 * i, 255 - 40 * i, (90 * i) % 256)) for i in range(count)]


def _decode(path, durations: list | None = None) -> list[np.ndarray]:
    """The frames of an animated WebP / GIF (and each frame's duration in ms into `durations`)."""
    with Image.open(path) as video:
        frames = []
        for index in range(video.n_frames):
            video.seek(index)
            frames.append(np.asarray(video.convert("RGB")))
            if durations is not None:
                durations.append(video.info.get("duration"))
    return frames


@pytest.mark.parametrize("suffix", ["webp", "gif"])
def test_save_video_writes_every_frame(tmp_path, suffix):
    frames = _frames()
    path = save_video(frames, tmp_path / "sub" / f"clip.{suffix}", fps=8)
    durations = []
    decoded = _decode(path, durations)
    assert len(decoded) == 5 and all(frame.shape == (16, 24, 3) for frame in decoded)
    assert durations == [125 if suffix == "webp" else 120] * 5  # ms per frame at 8 fps (GIF: in 10 ms units)
    if suffix == "webp":  # lossless: the frames come back exactly
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(decoded, frames))
    else:  # GIF's palette: flat colours are kept up to the quantisation
        assert all(np.abs(a.astype(int) - np.asarray(b)).max() <= 8 for a, b in zip(decoded, frames))
    with pytest.raises(ValueError, match="'avi'"):
        save_video(frames, tmp_path / "clip.avi")


def test_save_video_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="MP4 needs the extra 'video' (imageio, imageio-ffmpeg)")
    import imageio.v3 as iio

    path = save_video(_frames(size=(32, 32)), tmp_path / "clip.mp4", fps=8)
    video = iio.imread(path, plugin="FFMPEG")
    assert video.shape == (5, 32, 32, 3)


def test_frame_grid_rows_of_frames_with_labels():
    videos = [_frames(9, (16, 16)), _frames(3, (16, 16))]
    assert frame_indices(9, 4) == [0, 3, 5, 8] and frame_indices(3, 4) == [0, 1, 2] and frame_indices(5, 1) == [0]
    grid = frame_grid(videos, ["a prompt", "another"], max_frames=4, label_width=100, padding=2)
    assert grid.size == (100 + 4 * (16 + 2) + 2, 2 * (16 + 2) + 2)
    # Row 0 shows frames 0, 3, 5, 8 of video 0 in order; row 1 the three frames of video 1, then blank.
    for column, index in enumerate([0, 3, 5, 8]):
        assert grid.getpixel((100 + 2 + column * 18 + 8, 2 + 8)) == videos[0][index].getpixel((0, 0))
    assert grid.getpixel((100 + 2 + 3 * 18 + 8, 2 + 18 + 8)) == (255, 255, 255)
    assert len(grid.crop((0, 0, 100, 18)).getcolors()) > 1  # the label is drawn
    assert frame_grid(videos, tile=8, max_frames=None).size == (9 * (8 + 4) + 4, 2 * (8 + 4) + 4)  # no labels


def test_eval_command_on_tiny_wan_writes_videos_and_frame_grids(tmp_path):
    out = tmp_path / "eval"
    argv = [
        "--model_name_or_path", "tiny:wan",
        "--adapters", '{"toy": "toy:1"}',
        "--prompts", '{"brightness": ["a red ball", "two cats"]}',
        "--resolution", str(TINY_WAN_RESOLUTION),
        "--num_frames", str(TINY_WAN_FRAMES),
        "--num_inference_steps", "2",
        "--guidance_scale", "1.0",
        "--max_sequence_length", "16",
        "--fps", "8",
        "--output_dir", str(out),
        "--device", "cpu",
    ]  # fmt: skip
    assert eval_script.main(argv) == 0
    result = (out / "results.md").read_text()
    assert "2 steps (UniPCMultistepScheduler)" in result and "5 frames" in result  # the pipeline's own sampler
    brightness = get_reward("brightness")
    for label in ["base", "toy"]:
        grid = Image.open(out / "grids" / f"{label}.png")
        # Two rows (one per video) of 5 frames at the default 256-pixel tiles, a 160-pixel label column.
        assert grid.size == (160 + 5 * (256 + 4) + 4, 2 * (256 + 4) + 4)
        paths = [out / "videos" / label / f"0-{i}.webp" for i in range(2)]
        decoded = [_decode(path) for path in paths]
        assert [len(frames) for frames in decoded] == [5, 5]
        assert all(frame.shape == (32, 32, 3) for frames in decoded for frame in frames)
        # The table's score of each video is the mean over its frames (lossless WebP: the same frames).
        import json

        per_image = json.loads((out / "results.json").read_text())["per_image"][label]["brightness"]
        frames = [[Image.fromarray(frame) for frame in frames] for frames in decoded]
        assert per_image == pytest.approx(brightness(frames), abs=1e-6)
        assert per_image == pytest.approx([np.mean([brightness([f])[0] for f in v]) for v in frames], abs=1e-6)
    assert not np.array_equal(_decode(out / "videos" / "base" / "0-0.webp")[2], _decode(paths[0])[2])


def test_training_samples_write_videos_and_the_card_shows_them(tmp_path):
    pipe = get_tiny_wan_pipeline(seed=0)
    targets = ["attn1.to_q", "attn1.to_v"]
    teacher = save_toy_lora(pipe, tmp_path / "t", seed=1, std=0.1, rank=2, target_modules=targets)
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        ema=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_sequence_length=16,
        resolution=TINY_WAN_RESOLUTION,
        num_frames=TINY_WAN_FRAMES,
        num_inference_steps=2,
        guidance_scale=1.0,
    )
    from peft import LoraConfig

    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": str(teacher)},
        args=args,
        train_dataset={"geneval": ["a red ball", "two cats"]},
        peft_config=LoraConfig(r=2, lora_alpha=2, target_modules=targets),
    )
    callback = RewardEvalCallback(trainer, rewards="brightness", num_prompts=2, fps=8, grid_image_size=None)
    metrics = callback.evaluate(3)
    folder = tmp_path / "out" / "samples"
    video = folder / "step-000003-geneval.webp"
    frames = _decode(video)
    assert len(frames) == TINY_WAN_FRAMES and frames[0].shape == (32, 32, 3)
    assert Image.open(folder / "step-000003.png").size == (160 + 5 * (32 + 4) + 4, 2 * (32 + 4) + 4)
    with torch.no_grad():
        samples = trainer.generate(["a red ball", "two cats"], seed=0)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(samples[0], frames))  # the first sample, lossless
    expected = np.mean(get_reward("brightness")(samples))
    assert metrics["rewards/geneval/brightness"] == pytest.approx(expected, abs=1e-6)
    card = str(create_model_card(trainer))
    assert "![geneval: a red ball](samples/step-000003-geneval.webp)" in card
    assert "url: samples/step-000003-geneval.webp" in card and "samples/step-000003.png" in card
    # An MP4 (which Markdown images do not play) is shown as a video element.
    card = str(create_model_card(trainer, samples=[{"text": "a red ball", "url": "samples/a.mp4"}]))
    assert '<video src="samples/a.mp4" controls autoplay loop muted title="a red ball"></video>' in card
