"""Rows with input images: `image` as a PIL image, a path (relative to the data file) or a `datasets.Image` column, one
or several; missing and unreadable files fail at load in one line; the conditioning cache keys on the pixels; families
and trainers that take no images refuse such rows before training."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import constants as hub_constants

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.data import image_digest, load_prompt_source, prompts_by_task, row_images
from trl_diffusion_opd.families.base import FlowMatchingFamily
from trl_diffusion_opd.testing import (
    get_tiny_flux_kontext_pipeline,
    get_tiny_flux_pipeline,
    get_tiny_input_image,
    save_to_hub_cache,
    save_toy_lora,
)
from trl_diffusion_opd.trainer.base_trainer import PromptCache


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "data" / "pictures"
    folder.mkdir(parents=True)
    for seed in (1, 2):
        get_tiny_input_image(seed, 32, 40).save(folder / f"{seed}.png")
    return folder


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy())


def test_jsonl_paths_resolve_against_the_data_file(pictures, tmp_path, monkeypatch):
    data = pictures.parent / "edits.jsonl"
    rows = [
        {"prompt": "make it red", "task": "edit", "image": "pictures/1.png"},
        {"prompt": "combine", "task": "edit", "image": ["pictures/1.png", "pictures/2.png"]},
        {"prompt": "a cat", "task": "t2i"},
        {"prompt": "a dog", "task": "t2i", "image": None},
    ]
    data.write_text("\n".join(json.dumps(row) for row in rows))
    monkeypatch.chdir(tmp_path)  # elsewhere than the data file
    loaded = prompts_by_task(str(data))
    edit, t2i = loaded["edit"], loaded["t2i"]
    assert edit[0]["image"] == [str(pictures / "1.png")]
    assert edit[1]["image"] == [str(pictures / "1.png"), str(pictures / "2.png")]
    assert "image" not in t2i[0] and t2i[1]["image"] is None
    assert row_images(t2i[0]) is None and row_images(t2i[1]) is None
    images = row_images(edit[1])
    assert [image.size for image in images] == [(40, 32), (40, 32)]
    assert torch.equal(_pixels(images[1]), _pixels(get_tiny_input_image(2, 32, 40)))


def test_csv_column_of_paths_resolves_against_the_csv(pictures, tmp_path, monkeypatch):
    data = pictures.parent / "edits.csv"
    data.write_text("prompt,image\nmake it red,pictures/2.png\na cat,\n")
    monkeypatch.chdir(tmp_path)
    rows = load_prompt_source(str(data))
    assert rows[0]["image"] == [str(pictures / "2.png")] and rows[1]["image"] is None


def test_missing_or_unreadable_image_is_one_line_naming_row_and_file(pictures, tmp_path):
    data = pictures.parent / "edits.jsonl"
    data.write_text(
        json.dumps({"prompt": "ok", "image": "pictures/1.png"})
        + "\n"
        + json.dumps({"prompt": "make it red", "image": "pictures/missing.png"})
    )
    missing = str(pictures / "missing.png")
    with pytest.raises(ValueError) as error:
        load_prompt_source(str(data), "task 'edit'")
    assert str(error.value) == f"task 'edit': row 1 ('make it red'): input image '{missing}' does not exist."
    (pictures / "broken.png").write_text("not a picture")
    with pytest.raises(ValueError, match=r"^edits: row 0 \('x'\): input image '.*broken.png' is not a readable image"):
        load_prompt_source([{"prompt": "x", "image": str(pictures / "broken.png")}], "edits")
    with pytest.raises(ValueError, match=r"row 0 \('x'\): 'image' must be a PIL image, a path"):
        load_prompt_source([{"prompt": "x", "image": 3}], "edits")


def _image_dataset() -> datasets.Dataset:
    features = datasets.Features({"prompt": datasets.Value("string"), "image": datasets.Image()})
    images = [get_tiny_input_image(1, 32, 40), get_tiny_input_image(2, 32, 40)]
    return datasets.Dataset.from_dict({"prompt": ["make it red", "add a hat"], "image": images}, features=features)


def test_datasets_image_column_in_memory_on_disk_and_on_the_hub(tmp_path, monkeypatch):
    expected = _pixels(get_tiny_input_image(2, 32, 40))
    rows = load_prompt_source(_image_dataset())
    assert isinstance(rows[1]["image"][0], PIL.Image.Image)
    assert torch.equal(_pixels(row_images(rows[1])[0]), expected)

    _image_dataset().save_to_disk(str(tmp_path / "saved"))
    assert torch.equal(_pixels(row_images(load_prompt_source(str(tmp_path / "saved"))[1])[0]), expected)

    repo = tmp_path / "repo"
    repo.mkdir()
    _image_dataset().to_parquet(str(repo / "train.parquet"))
    cache = tmp_path / "hub-cache"
    save_to_hub_cache(repo, "org/edit-prompts", cache, repo_type="dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    hub_rows = load_prompt_source("org/edit-prompts")
    assert [row["prompt"] for row in hub_rows] == ["make it red", "add a hat"]
    assert torch.equal(_pixels(row_images(hub_rows[1])[0]), expected)


class _CountingFamily:
    """Encodes a prompt to its length and an image row to its first pixel; counts the rows it encodes."""

    text_encoders: list = []

    def __init__(self):
        self.encoded = 0

    def encode_prompts(self, prompts, images=None):
        self.encoded += len(prompts)
        cond = {"length": torch.tensor([[float(len(p))] for p in prompts])}
        if images is not None:
            cond["pixel"] = torch.tensor([[float(sum(im[0].getpixel((0, 0))))] for im in images])
        return cond

    def encode_negative(self, negative_prompt, images):
        return None  # the negative does not depend on the images

    batch_key = FlowMatchingFamily.batch_key  # rows batch together when their tensors' shapes match


def test_conditioning_cache_keys_on_the_pixels_not_the_path(pictures, tmp_path):
    copy = tmp_path / "copy.png"
    copy.write_bytes((pictures / "1.png").read_bytes())
    family = _CountingFamily()
    cache = PromptCache(family, max_size=8)
    first = row_images({"image": [str(pictures / "1.png")]})
    same = row_images({"image": [str(copy)]})
    other = row_images({"image": [str(pictures / "2.png")]})
    assert image_digest(first) == image_digest(same) != image_digest(other)
    cache(["edit"], [first])
    cache(["edit"], [same])  # another file, the same pixels: cached
    assert family.encoded == 1 and len(cache) == 1
    rows = cache.rows(["edit", "edit", "edit"], [first, other, None])  # other pixels and no image: two more rows
    assert family.encoded == 3 and len(cache) == 3
    assert [sorted(row) for row in rows] == [["length", "pixel"], ["length", "pixel"], ["length"]]
    assert rows[0]["pixel"].item() == sum(first[0].getpixel((0, 0)))
    assert rows[1]["pixel"].item() == sum(other[0].getpixel((0, 0))) != rows[0]["pixel"].item()
    copy.write_bytes((pictures / "2.png").read_bytes())  # the same path, new content: a new entry
    cache(["edit"], [row_images({"image": [str(copy)]})])
    assert family.encoded == 3  # ... whose pixels are those of 2.png, already cached
    assert cache.groups(["a", "b", "c"], [first, None, other]) == [[0, 2], [1]]


def test_families_and_trainers_without_images_refuse_image_rows(tmp_path):
    image = get_tiny_input_image(1)
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"), resolution=32, report_to="none", max_sequence_length=32
    )
    flux = get_tiny_flux_pipeline(seed=0)
    teacher = str(save_toy_lora(flux, tmp_path / "t", seed=1, rank=2))
    with pytest.raises(ValueError) as error:
        DiffusionOPDTrainer(
            flux, {"edit": teacher}, args=args, train_dataset={"edit": [{"prompt": "x", "image": image}]}
        )
    assert str(error.value) == (
        "Task 'edit' row 0 ('x') has 1 input image, but the flux family (FluxPipeline) takes no input images."
    )
    rows = [{"prompt": "a", "image": image}, {"prompt": "combine", "image": [image, image]}]
    with pytest.raises(ValueError) as error:
        DiffusionOPDTrainer(
            get_tiny_flux_kontext_pipeline(seed=0), {"edit": teacher}, args=args, train_dataset={"edit": rows}
        )
    assert str(error.value) == (
        "Task 'edit' row 1 ('combine') has 2 input images, but the flux-kontext family (FluxKontextPipeline) takes at "
        "most 1."
    )
