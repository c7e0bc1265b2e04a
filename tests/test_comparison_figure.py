"""`comparison_figure`: models as rows (name at the left), the same prompts as columns (text above), the table below."""

import numpy as np
import pytest
from PIL import Image

from trl_diffusion_opd.figures import comparison_figure


def _tile(color, size=32):
    return Image.new("RGB", (size, size), color)


COLORS = {"base": (255, 0, 0), "teacher: letters": (0, 255, 0), "student: DiffusionOPD": (0, 0, 255)}
PROMPTS = ["a red circle on the left", "the letter K", "two small blue squares above a large green triangle"]


def _figure(**kwargs):
    rows = {name: [_tile(color) for _ in PROMPTS] for name, color in COLORS.items()}
    return comparison_figure(rows, PROMPTS, **kwargs)


def _dark(region: np.ndarray) -> int:
    """Pixels of text (dark on the white background) in an (H, W, 3) region."""
    return int((region.min(axis=-1) < 128).sum())


def test_size_is_columns_times_tile_plus_margins_and_tiles_sit_in_their_cells():
    tile, label_width, padding = 64, 150, 6
    figure = np.asarray(_figure(tile=tile, label_width=label_width, padding=padding))
    assert figure.shape[1] == label_width + len(PROMPTS) * (tile + padding) + padding
    # the images: found where the layout says, each row its model's colour (enlarged by nearest neighbour)
    header = figure.shape[0] - len(COLORS) * (tile + padding)  # rows end with a bottom margin
    for r, color in enumerate(COLORS.values()):
        y = header + r * (tile + padding)
        for c in range(len(PROMPTS)):
            x = label_width + c * (tile + padding)
            assert (figure[y : y + tile, x : x + tile] == color).all()
            assert (figure[y - 1, x : x + tile] != color).any()  # the cell starts exactly there
    # every row has its label at the left, and every column its prompt above
    for r in range(len(COLORS)):
        y = header + r * (tile + padding)
        assert _dark(figure[y : y + tile, :label_width]) > 20
    for c in range(len(PROMPTS)):
        x = label_width + c * (tile + padding)
        assert _dark(figure[:header, x : x + tile]) > 20
    assert _dark(figure[:header, :label_width]) == 0  # the corner stays empty


def test_table_goes_below_and_longer_labels_wrap():
    table = [["model", "letters", "Average"], ["base", "0.621", "0.626"], ["student: DiffusionOPD", "0.735", "0.696"]]
    plain, with_table = np.asarray(_figure(tile=48)), np.asarray(_figure(tile=48, table=table))
    assert with_table.shape[1] == plain.shape[1]
    assert with_table.shape[0] > plain.shape[0] + len(table) * 12  # a line per table row
    assert (with_table[: plain.shape[0]] == plain).all()  # the images and labels are unchanged above it
    assert _dark(with_table[plain.shape[0] :]) > 100

    # a long prompt wraps onto more lines (a taller header), capped at max_prompt_lines
    short = comparison_figure({"m": [_tile((0, 0, 0))]}, ["x"], tile=48)
    long = comparison_figure({"m": [_tile((0, 0, 0))]}, [" ".join(["word"] * 40)], tile=48, max_prompt_lines=3)
    assert long.size[0] == short.size[0] and long.size[1] > short.size[1]
    capped = comparison_figure({"m": [_tile((0, 0, 0))]}, [" ".join(["word"] * 40)], tile=48, max_prompt_lines=6)
    assert capped.size[1] > long.size[1]


def test_rows_must_match_the_prompts():
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        comparison_figure({"base": [_tile((0, 0, 0))] * 2}, PROMPTS)
    with pytest.raises(ValueError, match="at least one row"):
        comparison_figure({}, PROMPTS)


def test_inputs_are_the_first_row_labelled_input():
    """Editing: each prompt's input image is drawn, pixel for pixel, as the first row ("input"), a text-only prompt's
    cell left white; the models' rows follow unchanged."""
    from trl_diffusion_opd.testing import get_tiny_input_image

    tile, label_width, padding = 32, 150, 6
    inputs = [get_tiny_input_image(1, tile, tile), None, get_tiny_input_image(2, tile, tile)]
    figure = np.asarray(_figure(tile=tile, label_width=label_width, padding=padding, inputs=inputs))
    plain = np.asarray(_figure(tile=tile, label_width=label_width, padding=padding))
    assert figure.shape[0] == plain.shape[0] + tile + padding
    header = figure.shape[0] - (len(COLORS) + 1) * (tile + padding)
    for c, image in enumerate(inputs):
        x = label_width + c * (tile + padding)
        cell = figure[header : header + tile, x : x + tile]
        assert (cell == (np.asarray(image) if image is not None else 255)).all()
    assert _dark(figure[header : header + tile, :label_width]) > 10  # the label "input"
    below = figure[header + tile + padding :]
    assert (below == plain[plain.shape[0] - below.shape[0] :]).all()  # the models' rows, as without inputs
    with pytest.raises(ValueError, match="`inputs` has 1 images for 3 prompts"):
        comparison_figure({"base": [_tile((0, 0, 0))] * 3}, PROMPTS, inputs=inputs[:1])
    with pytest.raises(ValueError, match="no model row may have that name"):
        comparison_figure({"input": [_tile((0, 0, 0))] * 3}, PROMPTS, inputs=inputs)
