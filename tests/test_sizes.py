"""Non-square sizes: `resolution` is a side or a height x width pair (`[32, 48]`, `"32x48"`) that round-trips through
the config, and an off-grid size is one clear error. Every family's rollout at a non-square size is checked against
its pipeline by the family contract (`tests/test_family_contract.py`)."""

import json

import pytest

from trl_diffusion_opd import DiffusionOPDConfig
from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.sizes import format_resolution, image_size, parse_resolution
from trl_diffusion_opd.testing import get_tiny_flux_pipeline


def test_resolution_forms_normalise_and_round_trip(tmp_path):
    assert parse_resolution(512) == parse_resolution("512") == parse_resolution([512, 512]) == 512
    assert parse_resolution("480x832") == parse_resolution([480, 832]) == parse_resolution((480, 832)) == (480, 832)
    assert image_size(512) == (512, 512) and image_size([480, 832]) == (480, 832)
    assert format_resolution(512) == "512 px" and format_resolution((480, 832)) == "480 × 832 px"
    args = DiffusionOPDConfig(output_dir=str(tmp_path), resolution="48x80", report_to="none")
    assert args.resolution == (48, 80)
    saved = json.loads(args.to_json_string())["resolution"]
    assert saved == [48, 80]
    assert DiffusionOPDConfig(output_dir=str(tmp_path), resolution=saved, report_to="none").resolution == (48, 80)
    assert DiffusionOPDConfig(output_dir=str(tmp_path), resolution=[48, 48], report_to="none").resolution == 48


def test_off_grid_side_names_both_sides_in_one_line():
    family = get_family(get_tiny_flux_pipeline(seed=0))
    assert family.resolution_multiple == 4
    family.check_resolution((32, 48))
    with pytest.raises(ValueError) as error:
        family.check_resolution((50, 80))
    assert str(error.value) == (
        "`resolution` must be a multiple of 4 for this flux pipeline (VAE scale factor 2 x latent patch 2), got 50x80; "
        "e.g. 48x80."
    )
