"""Figures of generated samples: image grids, videos (animated WebP / GIF, MP4) and their frame grids, and the
comparison figure of several models on the same prompts (with a table of scores).

`trl_diffusion_opd.evaluation` and the training-time samples (`trainer.callbacks`) draw and write with these; they
need only Pillow (and diffusers' video export for GIF / MP4).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image


# Video files: animated WebP (the default) and GIF through Pillow, which the Hub shows inline like images; MP4
# through diffusers' `export_to_video` (needs imageio and imageio-ffmpeg: the extra `video`).
VIDEO_FORMATS = ("webp", "gif", "mp4")


# ---------------------------------------------------------------------------------------------- images
def make_grid(rows: Sequence[Sequence[Image.Image]], size: int | None = None, padding: int = 2) -> Image.Image:
    """One image with `rows` of images side by side (shorter rows are left blank), each resized to `size` pixels
    square when given, else to the first image's size."""
    images = [image for row in rows for image in row]
    if not images:
        raise ValueError("No images to put in a grid.")
    width, height = (size, size) if size else images[0].size
    columns = max(len(row) for row in rows)
    grid = Image.new(
        "RGB", (columns * width + (columns + 1) * padding, len(rows) * height + (len(rows) + 1) * padding), "white"
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = image.convert("RGB")
            if tile.size != (width, height):
                tile = tile.resize((width, height), Image.Resampling.BICUBIC)
            grid.paste(tile, (padding + c * (width + padding), padding + r * (height + padding)))
    return grid


def blank_like(image: Image.Image | None, like: Image.Image) -> Image.Image:
    """`image` as a grid tile beside `like` (a white tile of `like`'s size when there is no image)."""
    return image.convert("RGB") if image is not None else Image.new("RGB", like.size, "white")


def is_video(sample: Any) -> bool:
    """Whether a generated sample is a video (a list of PIL frames, as the video families decode) or one image."""
    return isinstance(sample, (list, tuple))


def save_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: int = 16) -> Path:
    """Write `frames` (PIL images) as a video, its format by `path`'s suffix: `.webp` (animated, lossless) or
    `.gif` through Pillow (`diffusers.utils.export_to_gif`), `.mp4` through `diffusers.utils.export_to_video`
    (imageio + imageio-ffmpeg: `pip install "trl-diffusion-opd[video]"`). Returns the path.

    Raises:
        ValueError: no frames, or a suffix other than `.webp`, `.gif`, `.mp4`.
        ImportError: `.mp4` without imageio and imageio-ffmpeg.
    """
    path = Path(path)
    frames = [frame.convert("RGB") for frame in frames]
    if not frames:
        raise ValueError(f"No frames to write to {path}.")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in VIDEO_FORMATS:
        raise ValueError(f"Video format '{suffix}' of {path} is not one of {', '.join(VIDEO_FORMATS)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == "webp":
        # Each frame's duration in ms; `loop=0` repeats forever, as a GIF on the Hub does.
        frames[0].save(
            path, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0,
            lossless=True,
        )  # fmt: skip
    elif suffix == "gif":
        from diffusers.utils import export_to_gif

        export_to_gif(frames, str(path), fps=fps)
    else:
        import importlib.util

        if importlib.util.find_spec("imageio") is None or importlib.util.find_spec("imageio_ffmpeg") is None:
            raise ImportError(
                "Writing MP4 needs imageio and imageio-ffmpeg: pip install 'trl-diffusion-opd[video]' "
                "(or use the video format 'webp' or 'gif')."
            )
        from diffusers.utils import export_to_video

        export_to_video(frames, str(path), fps=fps)
    return path


def frame_indices(count: int, max_frames: int | None) -> list[int]:
    """`max_frames` frame indices spread evenly over `count` frames (first and last included); all when fewer."""
    if max_frames is None or count <= max_frames:
        return list(range(count))
    if max_frames == 1:
        return [0]
    return [round(i * (count - 1) / (max_frames - 1)) for i in range(max_frames)]


def frame_grid(
    videos: Sequence[Sequence[Image.Image]],
    labels: Sequence[str] | None = None,
    max_frames: int | None = 8,
    tile: int | None = None,
    label_width: int = 160,
    font_size: int = 12,
    padding: int = 4,
    max_label_lines: int = 6,
) -> Image.Image:
    """One PNG-ready image of videos: a row per video with its frames left to right (at most `max_frames`, spread
    evenly, first and last included), its label (e.g. the prompt) at the left.

    Args:
        videos: One list of PIL frames per row.
        labels: One text per row; `None` draws no label column.
        max_frames: Frames shown per row (`None`: all).
        tile: Side of each frame in pixels (square); `None`: the first frame's size.
        label_width: Width of the label column in pixels (when there are labels).
        font_size, padding, max_label_lines: Text size, space between tiles and around, lines of a label.

    Returns:
        An RGB image of width `[label_width] + n · (w + padding) + padding` and height `rows · (h + padding) +
        padding`, `n` the most frames shown in a row and `(w, h)` the tile size.
    """
    from PIL import ImageDraw, ImageFont

    if not videos or any(len(video) == 0 for video in videos):
        raise ValueError("`frame_grid` needs at least one video, each with at least one frame.")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"{len(labels)} labels for {len(videos)} videos.")
    rows = [[video[i] for i in frame_indices(len(video), max_frames)] for video in videos]
    width, height = (tile, tile) if tile else rows[0][0].size
    left = label_width if labels is not None else 0
    columns = max(len(row) for row in rows)
    grid = Image.new(
        "RGB", (left + columns * (width + padding) + padding, len(rows) * (height + padding) + padding), "white"
    )
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=font_size) if labels is not None else None
    for r, row in enumerate(rows):
        y = padding + r * (height + padding)
        if labels is not None:
            lines = _wrap(draw, str(labels[r]), font, label_width - 2 * padding, max_label_lines)
            for i, text in enumerate(lines):
                draw.text((padding, y + i * (font_size + 3)), text, fill="black", font=font)
        for c, frame in enumerate(row):
            frame = frame.convert("RGB")
            if frame.size != (width, height):
                frame = frame.resize((width, height), Image.Resampling.BICUBIC)
            grid.paste(frame, (left + padding + c * (width + padding), y))
    return grid


def _wrap(draw, text: str, font, width: int, max_lines: int | None = None) -> list[str]:
    """`text` in lines no wider than `width` pixels (words longer than a line are cut); `max_lines` ends with …."""
    lines: list[str] = []
    for word in text.split():
        while draw.textlength(word, font=font) > width and len(word) > 1:  # a word wider than the line
            cut = max(1, int(len(word) * width / draw.textlength(word, font=font)) - 1)
            lines.append(word[:cut])
            word = word[cut:]
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "…"
    return lines or [""]


def comparison_figure(
    rows: dict[str, Sequence[Image.Image]],
    prompts: Sequence[str],
    table: Sequence[Sequence[str]] | None = None,
    tile: int = 96,
    label_width: int = 150,
    font_size: int = 12,
    padding: int = 6,
    max_prompt_lines: int = 4,
    inputs: Sequence[Image.Image | None] | None = None,
) -> Image.Image:
    """One figure comparing models on the same prompts: a column per prompt (its text above), a row per model (its
    name at the left), and optionally a table of scores below. With `inputs` (editing), the first row, labelled
    "input", shows each prompt's input image above the models' outputs.

    Args:
        rows: `{model name: images}`, one image per prompt, in `prompts`' order; all rows the same length.
        prompts: The prompt of each column.
        table: Text cells, the first row the header (e.g. `EvaluationResult.table_rows()`); drawn below the images
            with aligned columns (first column left-aligned, the others right-aligned).
        tile: Side of each image in pixels (images are resized, nearest-neighbour when enlarged so that small
            samples stay sharp).
        label_width: Width of the model-name column in pixels.
        font_size: Size of Pillow's default font (`ImageFont.load_default(size)`, Pillow >= 10.1).
        padding: Space between tiles and around the figure, in pixels.
        max_prompt_lines: Prompt text lines above a column; longer prompts end with "…".
        inputs: Each prompt's input image (e.g. `EvaluationResult.sample_inputs`; `None`: a text-to-image prompt,
            left blank), drawn as the first row, "input".

    Returns:
        An RGB image of width `label_width + len(prompts) * (tile + padding) + padding` on a white background.

    Raises:
        ValueError: no rows, or a row (or `inputs`) without one image per prompt.
    """
    from PIL import ImageDraw, ImageFont

    if not rows or not prompts:
        raise ValueError("`comparison_figure` needs at least one row and one prompt.")
    if inputs is not None:
        if len(inputs) != len(prompts):
            raise ValueError(f"`inputs` has {len(inputs)} images for {len(prompts)} prompts.")
        if "input" in rows:
            raise ValueError("`inputs` makes the row 'input': no model row may have that name.")
        blank = Image.new("RGB", (tile, tile), "white")
        rows = {"input": [blank if image is None else image for image in inputs], **rows}
    for name, images in rows.items():
        if len(images) != len(prompts):
            raise ValueError(f"Row '{name}' has {len(images)} images for {len(prompts)} prompts.")
    font = ImageFont.load_default(size=font_size)
    line = font_size + 3  # line height in pixels
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    headers = [_wrap(scratch, text, font, tile, max_prompt_lines) for text in prompts]
    header_height = max(len(lines) for lines in headers) * line + padding
    labels = {name: _wrap(scratch, name, font, label_width - 2 * padding) for name in rows}

    widths: list[float] = []
    if table:
        columns = max(len(cells) for cells in table)
        widths = [
            max(scratch.textlength(cells[c], font=font) for cells in table if c < len(cells)) for c in range(columns)
        ]
    table_height = (len(table) * line + 2 * padding) if table else 0

    width = label_width + len(prompts) * (tile + padding) + padding
    width = max(width, int(sum(widths) + 3 * padding * len(widths) + 2 * padding))
    height = padding + header_height + len(rows) * (tile + padding) + table_height
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)

    for column, lines in enumerate(headers):
        x = label_width + column * (tile + padding)
        y = padding + header_height - padding - len(lines) * line  # the text sits just above its column
        for i, text in enumerate(lines):
            draw.text((x, y + i * line), text, fill="black", font=font)
    for r, (name, images) in enumerate(rows.items()):
        y = padding + header_height + r * (tile + padding)
        lines = labels[name]
        top = y + (tile - len(lines) * line) // 2
        for i, text in enumerate(lines):
            draw.text((padding, top + i * line), text, fill="black", font=font)
        for column, image in enumerate(images):
            image = image.convert("RGB")
            if image.size != (tile, tile):
                enlarge = image.size[0] < tile
                resample = Image.Resampling.NEAREST if enlarge else Image.Resampling.BICUBIC
                image = image.resize((tile, tile), resample)
            figure.paste(image, (label_width + column * (tile + padding), y))
    if table:
        y = padding + header_height + len(rows) * (tile + padding) + padding
        draw.line([(padding, y - padding // 2), (width - padding, y - padding // 2)], fill="gray")
        for r, cells in enumerate(table):
            x = padding
            for c, text in enumerate(cells):
                if c == 0:
                    draw.text((x, y + r * line), text, fill="black", font=font)
                else:  # numbers right-aligned under their header
                    draw.text(
                        (x + widths[c] - draw.textlength(text, font=font), y + r * line), text, fill="black", font=font
                    )
                x += widths[c] + 3 * padding
    return figure
