"""Image sizes: a `resolution` is an `int` (the side of a square image) or a `(height, width)` pair, in pixels.

Configs accept `512`, `[480, 832]` (YAML, JSON, Python) and `"480x832"` (the command line) and keep the normalised
form, `Resolution`: an `int` for a square, a `(height, width)` tuple otherwise, so that square configs read and
serialise as before. Families, the evaluation and the model card turn it into `(height, width)` with `image_size`.
"""

from __future__ import annotations

import numbers
import re
from typing import Any


# The normalised form a config holds: a square's side, or (height, width).
Resolution = int | tuple[int, int]
# What a user may write: a side, a [height, width] pair, or a "HxW" string (the command line).
ResolutionLike = int | tuple[int, int] | list[int] | str
# The `help` of every config's `resolution` field (training and the eval command document it once).
RESOLUTION_HELP = (
    "Image size in pixels: a side (512: square images) or a height and width ([480, 832] in YAML or JSON, 480x832 on "
    "the command line), each a multiple of the family's `resolution_multiple` (16 for SD3 and FLUX: the VAE's 8x "
    "times the 2x2 latent patch), checked once the pipeline is loaded."
)

_TEXT = re.compile(r"\s*\[?\s*(\d+)\s*(?:[x×X,]\s*(\d+)\s*)?\]?\s*")


def parse_resolution(value: Any, name: str = "resolution") -> Resolution:
    """Normalise `value` to a `Resolution`: `512` and `"512"` give `512`; `[480, 832]`, `(480, 832)`, `"480x832"`
    give `(480, 832)`; a square pair gives its side. Raises a one-line `ValueError` naming `name` otherwise."""
    sides = [value]
    if isinstance(value, str) and (match := _TEXT.fullmatch(value)):
        # The numbers of the text, for the checks and the message ("48x0" reads as [48, 0], like the YAML form).
        sides = [int(match[1])] + ([int(match[2])] if match[2] else [])
        value = sides if len(sides) == 2 else sides[0]
    elif isinstance(value, (list, tuple)):
        sides = list(value)
    if len(sides) not in (1, 2) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in sides
    ):
        raise ValueError(
            f"`{name}` must be an integer >= 1 or a [height, width] pair of them (480x832 on the command line), got "
            f"{value!r}."
        )
    height, width = (int(s) for s in sides) if len(sides) == 2 else (int(sides[0]),) * 2
    return height if height == width else (height, width)


def image_size(resolution: Resolution | ResolutionLike) -> tuple[int, int]:
    """`(height, width)` in pixels of `resolution` (any form `parse_resolution` accepts)."""
    resolution = parse_resolution(resolution)
    return (resolution, resolution) if isinstance(resolution, int) else resolution


def format_resolution(resolution: Resolution | ResolutionLike) -> str:
    """For people (model cards, result notes): `"512 px"` for a square, `"480 × 832 px"` (height × width) otherwise."""
    height, width = image_size(resolution)
    return f"{height} px" if height == width else f"{height} × {width} px"
