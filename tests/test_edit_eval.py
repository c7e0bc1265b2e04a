"""Evaluation, training-time samples and the model card with editing rows (input images): the pipeline samples each
row with its images, grids put each sample's input above it, and the card's quick start passes `image=`."""

import math

import diffusers.pipelines.flux.pipeline_flux_kontext as kontext_pipeline
import pytest
import torch
from PIL import Image

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.evaluation import evaluate_models, generate_images
from trl_diffusion_opd.families import flux_kontext
from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.testing import (
    get_tiny_flux2_klein_pipeline,
    get_tiny_flux_kontext_pipeline,
    get_tiny_input_image,
    save_toy_lora,
)
from trl_diffusion_opd.trainer.callbacks import RewardEvalCallback


SIZE = (32, 48)
SAMPLING = {"num_inference_steps": 2, "guidance_scale": 2.5, "resolution": list(SIZE), "max_sequence_length": 16}
RED, BLUE = Image.new("RGB", (32, 40), (220, 20, 20)), Image.new("RGB", (32, 40), (20, 20, 220))


@pytest.fixture(autouse=True)
def tiny_kontext_resolutions(monkeypatch):
    """Kontext snaps references to ~1 MP preferred resolutions; tiny ones keep the tiny pipeline tiny."""
    tiny = [(32, 32), (48, 32), (32, 48)]
    monkeypatch.setattr(kontext_pipeline, "PREFERRED_KONTEXT_RESOLUTIONS", tiny)
    monkeypatch.setattr(flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", tiny)


def _brightness(images, prompts, metadata):
    return [
        float(torch.tensor(list(image.convert("L").tobytes())).sum()) / (255 * image.width * image.height)
        for image in images
    ]


def _kontext_call(pipe, image, **kwargs):
    """The Kontext pipeline's own sample of "edit" from `image` at `SIZE` (seed 3, 2 steps, guidance 2.5)."""
    with torch.no_grad():
        return pipe(
            prompt="edit",
            image=image,
            height=SIZE[0],
            width=SIZE[1],
            max_area=SIZE[0] * SIZE[1],
            num_inference_steps=2,
            guidance_scale=2.5,
            max_sequence_length=16,
            generator=torch.Generator("cpu").manual_seed(3),
            **kwargs,
        ).images[0]


def test_generate_images_passes_each_rows_images_as_the_family_does():
    """Kontext takes one image and rescales the output to `max_area`: the family passes the area of the resolution
    asked for, so the sample has that size, and its input image changes it."""
    pipe = get_tiny_flux_kontext_pipeline(seed=0)
    family = get_family(pipe)
    assert family.pipeline_image_kwargs([RED], SIZE) == {"image": RED, "max_area": 32 * 48, "_auto_resize": True}
    assert get_family(get_tiny_flux2_klein_pipeline(seed=0)).pipeline_image_kwargs([RED, BLUE], SIZE) == {
        "image": [RED, BLUE]
    }
    red, blue = generate_images(pipe, ["edit", "edit"], [3, 3], 2, 2.5, SIZE, 16, images=[[RED], [BLUE]])
    assert red.size == blue.size == (SIZE[1], SIZE[0])
    direct = _kontext_call(pipe, RED)
    assert red.tobytes() == direct.tobytes()
    assert red.tobytes() != blue.tobytes()


def test_eval_grid_puts_each_input_above_its_sample(tmp_path):
    pipe = get_tiny_flux_kontext_pipeline(seed=0)
    rows = [{"prompt": "make it red", "image": RED}, {"prompt": "make it blue", "image": BLUE}]
    result = evaluate_models(
        pipe,
        prompts={"brightness": rows, "brightness@t2i": ["a cat"]},
        rewards={"brightness": _brightness},
        grid_image_size=16,
        output_dir=tmp_path,
        progress=False,
        **SAMPLING,
    )
    assert [len(images) for images in result.samples["base"]] == [2, 1]  # the samples only
    inputs = result.sample_inputs
    assert len(inputs) == 2 and inputs[1] == []  # the text-only set has no inputs
    assert [image.getpixel((0, 0)) for image in inputs[0]] == [(220, 20, 20), (20, 20, 220)]
    grid = Image.open(result.grids["base"])
    assert grid.size == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2)  # inputs, edited samples, the text-only sample
    assert grid.getpixel((2 + 8, 2 + 8)) == (220, 20, 20)  # the first input, top left
    assert not math.isnan(result.scores["base"]["brightness"])


def test_training_samples_and_card_show_inputs_and_pass_image(tmp_path):
    pipe = get_tiny_flux_kontext_pipeline(seed=0)
    folder = tmp_path / "data"
    folder.mkdir()
    RED.save(folder / "red.png")
    teacher = str(save_toy_lora(pipe, tmp_path / "teacher", seed=1, rank=2))
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        resolution=list(SIZE),
        num_inference_steps=2,
        guidance_scale=2.5,
        per_device_train_batch_size=2,
        max_sequence_length=16,
        save_strategy="no",
        ema=False,
        report_to="none",
        disable_tqdm=True,
        family_kwargs={"auto_resize": False},
    )
    rows = [{"prompt": "make it red", "image": str(folder / "red.png")}, {"prompt": "make it blue", "image": BLUE}]
    trainer = DiffusionOPDTrainer(pipe, {"edit": teacher}, args=args, train_dataset={"edit": rows})
    callback = RewardEvalCallback(trainer, rewards="brightness", grid_image_size=16)
    trainer.add_callback(callback)
    trainer.train()
    grid = Image.open(tmp_path / "out" / "samples" / "step-000001.png")
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # a row of inputs above the row of samples
    assert grid.getpixel((2 + 8, 2 + 8)) == (220, 20, 20) and grid.getpixel((20 + 8, 2 + 8)) == (20, 20, 220)
    assert trainer.sample_widgets[-1]["text"].startswith("edit (inputs above outputs): make it red")
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    code = card.split("```python")[1].split("```")[0]
    assert "from diffusers.utils import load_image\n" in code
    assert "    image=load_image('red.png'),  # the image(s) to edit\n" in code
    assert f"    max_area={SIZE[0] * SIZE[1]},\n    _auto_resize=False,\n" in code
    assert str(folder) not in card


@pytest.mark.parametrize(
    "name, model",
    [
        ("qwenimage_edit_2511", "Qwen/Qwen-Image-Edit-2511"),
        ("flux1_kontext_dev", "black-forest-labs/FLUX.1-Kontext-dev"),
        ("flux2_klein_base_4b_edit", "black-forest-labs/FLUX.2-klein-base-4B"),
    ],
)
def test_example_editing_configs_are_valid_recipes(tmp_path, name, model):
    import dataclasses
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "examples" / "configs" / f"{name}.yaml").read_text())
    fields = {f.name for f in dataclasses.fields(DiffusionOPDConfig)}
    assert set(config) - fields == {
        "model_name_or_path",
        "lora_r",
        "lora_alpha",
        "teachers",
        "prompts",
        "eval_prompts",
    }
    assert config["model_name_or_path"] == model
    assert set(config["teachers"]) == set(config["prompts"]) == set(config["eval_prompts"])
    args = DiffusionOPDConfig(**{**{k: v for k, v in config.items() if k in fields}, "output_dir": str(tmp_path)})
    assert args.resolution == 1024 and args.gradient_checkpointing and args.num_inference_steps == 10


def test_references_of_other_layouts_are_batched_apart_and_give_the_output_size(tmp_path):
    """Two references of 32 x 48 and 48 x 32 make as many tokens: Kontext and klein keep them in separate batches
    (their position ids differ), and with `size_from_image` each row's output is its reference's size."""
    wide, tall = get_tiny_input_image(1, 32, 48), get_tiny_input_image(2, 48, 32)
    for pipe, kwargs, sizes in (
        (get_tiny_flux_kontext_pipeline(seed=0), {"auto_resize": False}, [(32, 48), (48, 32)]),
        (get_tiny_flux2_klein_pipeline(seed=0), {}, [(64, 96), (96, 64)]),
    ):
        images = [[wide], [tall]] if sizes[0] == (32, 48) else [[wide.resize((96, 64))], [tall.resize((64, 96))]]
        teacher = str(save_toy_lora(pipe, tmp_path / type(pipe).__name__, seed=1, rank=2))
        args = DiffusionOPDConfig(
            output_dir=str(tmp_path / "out"),
            resolution=32,
            max_sequence_length=16,
            report_to="none",
            family_kwargs={**kwargs, "size_from_image": True},
        )
        rows = [{"prompt": "edit", "image": image} for image in images]
        trainer = DiffusionOPDTrainer(pipe, {"edit": teacher}, args=args, train_dataset={"edit": rows})
        conds = [trainer.prompt_cache(["edit"], [image]) for image in images]
        assert conds[0]["image_latents"].shape == conds[1]["image_latents"].shape
        assert trainer.prompt_cache.groups(["edit", "edit"], images) == [[0], [1]]
        assert [trainer.resolution_for(cond) for cond in conds] == sizes
        samples = trainer.generate(["edit", "edit"], images=images, num_inference_steps=1)
        assert [image.size for image in samples] == [(w, h) for h, w in sizes]


def test_editing_rows_are_encoded_before_the_text_encoders_leave(tmp_path):
    """With `offload_text_encoders` (the default) the editing rows are encoded with their images up front, as the text
    rows are, so training never brings the encoders back."""
    pipe = get_tiny_flux_kontext_pipeline(seed=0)
    teacher = str(save_toy_lora(pipe, tmp_path / "teacher", seed=1, rank=2))
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        resolution=32,
        max_sequence_length=16,
        report_to="none",
        family_kwargs={"auto_resize": False},
        task_prompt_templates={"edit": "edit: {prompt}"},
    )
    rows = [{"prompt": "make it red", "image": RED}, {"prompt": "make it blue", "image": BLUE}, "a cat"]
    trainer = DiffusionOPDTrainer(pipe, {"edit": teacher}, args=args, train_dataset={"edit": rows})
    cache = trainer.prompt_cache
    assert cache.encoders_offloaded
    # the negative, "a cat" and its student prompt, and both editing rows with their teacher and student prompts
    assert len(cache) == 1 + 2 + 2 * 2
    calls = []
    original = trainer.family.encode_prompts
    trainer.family.encode_prompts = lambda *a, **k: calls.append(a) or original(*a, **k)
    trainer.task_loss(trainer.model, "edit", rows[:2], torch.Generator().manual_seed(0), backward=False)
    assert calls == []


@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_reward_trainers_refuse_rows_with_images(tmp_path, method):
    from trl_diffusion_opd import DiffusionNFTConfig, DiffusionNFTTrainer, FlowGRPOConfig, FlowGRPOTrainer

    config, trainer = (
        (FlowGRPOConfig, FlowGRPOTrainer) if method == "grpo" else (DiffusionNFTConfig, DiffusionNFTTrainer)
    )
    args = config(output_dir=str(tmp_path / "out"), resolution=32, max_sequence_length=16, report_to="none")
    rows = ["a cat", {"prompt": "make it red", "image": RED}]
    with pytest.raises(
        ValueError, match=r"row 1 \('make it red'\) has input images, which the .* trainer does not use"
    ):
        trainer(get_tiny_flux_kontext_pipeline(seed=0), "brightness", args=args, train_dataset=rows)


def test_generate_images_and_eval_take_the_familys_options(tmp_path):
    """`family_kwargs` reach the family that samples: Kontext without `auto_resize` keeps the reference at its own size,
    as the pipeline does with `_auto_resize=False`; an option the family does not have is one line."""
    pipe = get_tiny_flux_kontext_pipeline(seed=0)
    snapped, own = (
        generate_images(pipe, ["edit"], [3], 2, 2.5, SIZE, 16, images=[[RED]], family_kwargs=options)[0]
        for options in (None, {"auto_resize": False})
    )
    direct = _kontext_call(pipe, RED, _auto_resize=False)
    assert own.tobytes() == direct.tobytes()
    assert snapped.tobytes() != own.tobytes()  # 32 x 40 snapped to 32 x 32 by default
    with pytest.raises(ValueError, match="no option 'area'"):
        generate_images(pipe, ["edit"], [3], 2, 2.5, SIZE, 16, images=[[RED]], family_kwargs={"area": 1})
    result = evaluate_models(
        pipe,
        prompts={"brightness": [{"prompt": "edit", "image": RED}]},
        rewards={"brightness": _brightness},
        include_base=True,
        family_kwargs={"auto_resize": False},
        progress=False,
        seed=3,
        **SAMPLING,
    )
    assert result.samples["base"][0][0].tobytes() == direct.tobytes()
