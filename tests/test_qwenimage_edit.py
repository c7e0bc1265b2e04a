"""Qwen-Image-Edit-Plus's own rules (2509 / 2511) on the tiny pipeline: the rollout reproduces
`QwenImageEditPlusPipeline.__call__` with one and two references (true CFG with the norm rescale, the negative
prompt encoded with the images, non-square output, with and without `zero_cond_t`), each row carries its own
negative, rows take 1 to 3 images, and `size_from_image` follows the pipeline's area rule. The family contract
(`tests/test_family_contract.py`, rows `qwenimage_edit_plus` and `qwenimage_edit`, the one-reference
`QwenImageEditPipeline`) checks the rest: KL 0 to itself, the distillation of two teachers (diffusers and PEFT
formats), the reload with `load_lora_weights` and the image dependence."""

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
import pytest
import torch

from trl_diffusion_opd import DiffusionOPDTrainer
from trl_diffusion_opd.families.base import NEGATIVE_PREFIX, get_family
from trl_diffusion_opd.families.qwenimage_edit import QwenImageEditPlusFamily
from trl_diffusion_opd.testing import get_tiny_qwenimage_edit_plus_pipeline

from helpers import EDIT_IMAGES as IMAGES
from helpers import EDIT_STYLE, QWEN_EDIT_AREAS, QWENIMAGE_EDIT_PLUS, tiny_qwen_edit_areas


SIZE = (32, 48)  # output height x width: 8 x 12 latents, 4 x 6 packed tokens (the contract row's)
STEPS = 3
TRUE_CFG = 4.0
NEGATIVE = " "  # Qwen's model cards
AREAS = QWEN_EDIT_AREAS  # the pipeline's 1 MP / 384² areas, made tiny (32 x 40 images: 32 x 64 references at 48²)
EDIT_ROWS = EDIT_STYLE["edit"]  # references of 32 x 40 and 48 x 32


@pytest.fixture(autouse=True)
def tiny_reference_areas():
    with tiny_qwen_edit_areas():
        yield


def _trainer(tmp_path, pipe=None, **settings):
    """A trainer of the contract row with one editing teacher and a non-zero student (the pipeline runs it)."""
    pipe = QWENIMAGE_EDIT_PLUS.build(seed=0) if pipe is None else pipe
    teachers = QWENIMAGE_EDIT_PLUS.save_teachers(pipe, tmp_path / "teachers", 1)
    student = {"init_lora_weights": False}
    return QWENIMAGE_EDIT_PLUS.trainer(tmp_path, pipe, teachers, student, num_inference_steps=STEPS, **settings)


@pytest.mark.parametrize("zero_cond_t", [True, False], ids=["2511", "2509"])
def test_rollout_reproduces_qwen_edit_plus_pipeline(tmp_path, zero_cond_t):
    """At noise level 0, true CFG 4 and 32 x 48 output, each row of a rollout gives `QwenImageEditPlusPipeline.
    __call__`'s latents from the same noise, prompt, negative prompt and images (the pipeline samples one row per
    call): its prompt and its negative encoded by the VL model with the images, the references' tokens appended
    (frames 1, 2, ...), the shift from the generated tokens, the norm rescale."""
    pipe = get_tiny_qwenimage_edit_plus_pipeline(seed=0, zero_cond_t=zero_cond_t)
    trainer = _trainer(tmp_path, pipe)
    assert isinstance(trainer.family, QwenImageEditPlusFamily)
    family = trainer.family
    for prompts, images in (
        (["make it red", "add a hat"], [[IMAGES[0]], [IMAGES[1]]]),
        (["as a sketch"], [[IMAGES[2], IMAGES[0]]]),  # two references of other sizes: frames 1 and 2
    ):
        cond = trainer.prompt_cache(prompts, images)
        shapes = [tuple(cond[f"reference_{k}"].shape[-2:]) for k in range(len(images[0]))]
        # 48² of area at the image's aspect, /32, then the tiny VAE's 4x: 32 x 64 -> 8 x 16; 64 x 32 -> 16 x 8.
        assert shapes == ([(8, 16)] if len(images[0]) == 1 else [(16, 8), (8, 16)])
        assert NEGATIVE_PREFIX + "prompt_embeds" in cond  # the negative, encoded with the row's images
        states = trainer.rollout(cond, torch.Generator().manual_seed(0))["states"]
        assert states.shape == (STEPS + 1, len(prompts), 4, 8, 12)
        for row, (prompt, image) in enumerate(zip(prompts, images)):
            with torch.no_grad():
                call = {"height": SIZE[0], "width": SIZE[1], "num_inference_steps": STEPS, "output_type": "latent"}
                latents = family.pack_latents(states[0, row : row + 1])
                guided = {"true_cfg_scale": TRUE_CFG, "negative_prompt": NEGATIVE}
                expected = pipe(image=image, prompt=prompt, latents=latents, **guided, **call).images
                # The pipeline without a negative prompt (no CFG): guidance changed the result, so it is pinned.
                unguided = pipe(image=image, prompt=prompt, latents=latents, **call).images
            torch.testing.assert_close(family.pack_latents(states[-1, row : row + 1]), expected, atol=1e-5, rtol=1e-5)
            assert (expected - unguided).abs().max() > 1e-2
    image = trainer.generate(["make it red"], images=[[IMAGES[0]]], num_inference_steps=2)[0]
    assert image.size == (SIZE[1], SIZE[0])


def test_each_row_carries_its_negative_encoded_with_its_images():
    """The negative branch sees the images: the same negative prompt encoded with other images gives other
    embeddings, and `velocity` uses the row's own negative rather than the text-only one it is passed."""
    pipe = get_tiny_qwenimage_edit_plus_pipeline(seed=0)
    family = get_family(pipe, AREAS, max_sequence_length=128)
    first, second = (family.encode_negative(NEGATIVE, [[image]]) for image in IMAGES[:2])
    assert set(first) == {"prompt_embeds", "prompt_embeds_mask"}
    torch.testing.assert_close(first["prompt_embeds_mask"], second["prompt_embeds_mask"])
    assert (first["prompt_embeds"] - second["prompt_embeds"]).abs().max() > 1e-3
    cond = family.encode_prompts(["add a hat"], [[IMAGES[0]]])
    text_only = family.encode_prompts([NEGATIVE])
    x = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8])
    with_own = {**cond, **{NEGATIVE_PREFIX + k: v for k, v in first.items()}}
    with torch.no_grad():
        own = family.velocity(pipe.transformer, x, sigma, with_own, TRUE_CFG, text_only)
        explicit = family.velocity(pipe.transformer, x, sigma, cond, TRUE_CFG, first)
        text = family.velocity(pipe.transformer, x, sigma, cond, TRUE_CFG, text_only)
    torch.testing.assert_close(own, explicit)
    assert (own - text).abs().max() > 1e-4


def test_rows_need_one_to_three_images(tmp_path):
    pipe = get_tiny_qwenimage_edit_plus_pipeline(seed=0)
    teacher = QWENIMAGE_EDIT_PLUS.save_teachers(pipe, tmp_path, 1)["edit"]
    args = QWENIMAGE_EDIT_PLUS.config(tmp_path / "out")
    with pytest.raises(ValueError, match=r"row 1 \('a cat'\) has no input images, but the qwenimage-edit-plus family"):
        DiffusionOPDTrainer(pipe, {"edit": teacher}, args=args, train_dataset={"edit": [EDIT_ROWS[0], "a cat"]})
    with pytest.raises(ValueError, match="has 4 input images, but the qwenimage-edit-plus family .* takes at most 3"):
        rows = [{"prompt": "mix", "image": IMAGES + IMAGES[:1]}]
        DiffusionOPDTrainer(pipe, {"edit": teacher}, args=args, train_dataset={"edit": rows})
    with pytest.raises(ValueError, match="`vae_image_size` of the qwenimage-edit-plus family must be an area"):
        get_family(pipe, {"vae_image_size": 16})


def test_size_from_image_samples_each_row_at_its_references_size(tmp_path):
    """With `size_from_image` a row's output is its last reference's size (the pipeline's size without `height` /
    `width`, at the VAE area): rows of other sizes are rolled out apart, each reproducing the pipeline at its size."""
    trainer = _trainer(tmp_path, family_kwargs={**AREAS, "size_from_image": True})
    pipe = trainer.pipeline
    family = trainer.family
    rows = [EDIT_ROWS[0], EDIT_ROWS[2]]  # 32 x 40 and 48 x 32 images: 32 x 64 and 64 x 32 outputs
    images = [[row["image"]] for row in rows]
    assert trainer.prompt_cache.groups([r["prompt"] for r in rows], images) == [[0], [1]]
    for row, (height, width) in zip(rows, [(32, 64), (64, 32)]):
        assert edit_plus.calculate_dimensions(AREAS["vae_image_size"], row["image"].width / row["image"].height) == (
            width,
            height,
        )
        cond = trainer.prompt_cache([row["prompt"]], [[row["image"]]])
        assert trainer.resolution_for(cond) == (height, width)
        states = trainer.rollout(cond, torch.Generator().manual_seed(0))["states"]
        assert states.shape[-2:] == (height // 4, width // 4)
        with torch.no_grad():
            expected = pipe(
                image=[row["image"]],
                prompt=row["prompt"],
                negative_prompt=NEGATIVE,
                true_cfg_scale=TRUE_CFG,
                latents=family.pack_latents(states[0]),
                height=height,
                width=width,
                num_inference_steps=STEPS,
                output_type="latent",
            ).images
        torch.testing.assert_close(family.pack_latents(states[-1]), expected, atol=1e-5, rtol=1e-5)
    _, kl = trainer.task_loss(trainer.model, "edit", rows, torch.Generator().manual_seed(0), backward=False)
    assert kl.shape == (trainer.args.train_timesteps_for("edit"),) and bool(torch.isfinite(kl).all())
    samples = trainer.generate([r["prompt"] for r in rows], images=images, num_inference_steps=2)
    assert [image.size for image in samples] == [(64, 32), (32, 64)]
