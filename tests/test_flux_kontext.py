"""FLUX.1 Kontext's own rules on the tiny Kontext pipeline: the reference's packing and position ids, true CFG whose
negative branch keeps the reference, the preferred resolutions (`auto_resize`), and rows with references of other
sizes batched apart. The family contract (`tests/test_family_contract.py`, row `flux_kontext`) checks the rest: the
rollout at the guidance embedding, KL 0 to itself, the distillation of two teachers, the reload and the image
dependence."""

import pytest
import torch

from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.families.flux_kontext import FluxKontextFamily
from trl_diffusion_opd.testing import get_tiny_flux_kontext_pipeline, get_tiny_input_image

from helpers import EDIT_IMAGES as IMAGES
from helpers import EDIT_STYLE, FLUX_KONTEXT


SIZE = (32, 48)  # output height x width: 8 x 12 packed tokens (the contract row's)
STEPS = 3
EDIT_ROWS = EDIT_STYLE["edit"]  # references of 32 x 40 (a 4 : 5 image, other than the output's 2 : 3) and 48 x 32


def test_rollout_with_true_cfg_keeps_the_reference_in_the_negative_branch(tmp_path):
    """Kontext without a guidance embedding (true CFG): at noise level 0 the trainer's rollout gives
    `FluxKontextPipeline.__call__`'s latents from the same noise, prompts and references: references packed and
    appended with ids (1, row, col) on both CFG branches. (The guidance-embedding case is the contract's.)"""
    pipe = get_tiny_flux_kontext_pipeline(seed=0, guidance_embeds=False)
    guidance = 4.0
    trainer = FLUX_KONTEXT.trainer(
        tmp_path, pipe, student={"init_lora_weights": False}, num_inference_steps=STEPS, guidance_scale=guidance
    )
    assert trainer.args.resolution == SIZE
    prompts, images = ["make it red", "add a hat"], [[IMAGES[0]], [IMAGES[1]]]
    cond = trainer.prompt_cache(prompts, images)
    assert cond["image_latents"].shape == (2, 8 * 10, 16)  # (32 / 2 / 2) x (40 / 2 / 2) tokens of 4 x 2 x 2
    torch.testing.assert_close(cond["image_ids"][0, 11], torch.tensor([1.0, 1.0, 1.0]))  # row 1, column 1
    states = trainer.rollout(cond, torch.Generator().manual_seed(0))["states"]
    assert states.shape == (STEPS + 1, 2, 4, 16, 24)
    family = trainer.family
    negative = trainer._negative(2)
    call = {
        "height": SIZE[0],
        "width": SIZE[1],
        "max_area": SIZE[0] * SIZE[1],
        "_auto_resize": False,
        "true_cfg_scale": guidance,
        "negative_prompt_embeds": negative["prompt_embeds"],
        "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"],
        "prompt_embeds": cond["prompt_embeds"],
        "pooled_prompt_embeds": cond["pooled_prompt_embeds"],
        "latents": family.pack_latents(states[0]),
        "num_inference_steps": STEPS,
        "output_type": "latent",
    }
    with torch.no_grad():
        expected = pipe(image=[IMAGES[0], IMAGES[1]], **call).images
        no_image = pipe(**call).images  # the references changed the result, so the comparison pins them
    torch.testing.assert_close(family.pack_latents(states[-1]), expected, atol=1e-5, rtol=1e-5)
    assert (expected - no_image).abs().max() > 1e-2


def test_reference_size_follows_the_pipeline():
    """`auto_resize` snaps to the preferred Kontext resolution nearest the aspect; without it the image's own size,
    floored to the packing multiple (16 at real size, 4 on the tiny VAE)."""
    pipe = get_tiny_flux_kontext_pipeline(seed=0)
    snapped = get_family(pipe)
    own = get_family(pipe, {"auto_resize": False})
    image = get_tiny_input_image(0, 201, 303)  # aspect 1.507: 1248 x 832 (1.5) is the nearest preferred size
    assert snapped.reference_size(image) == (832, 1248)
    assert own.reference_size(image) == (200, 300)
    assert isinstance(own, FluxKontextFamily)
    with pytest.raises(ValueError, match="`auto_resize` of the flux-kontext family must be true or false"):
        get_family(pipe, {"auto_resize": "yes"})


def test_rows_with_other_reference_sizes_are_separate_batches(tmp_path):
    """A task whose rows have references of two sizes runs them as two batches, one after the other: its KL per step
    is their row-weighted mean, the loss their sum over the task's rows."""
    trainer = FLUX_KONTEXT.trainer(
        tmp_path, teachers=FLUX_KONTEXT.save_teachers(FLUX_KONTEXT.build(seed=0), tmp_path, 1)
    )
    rows = [EDIT_ROWS[0], EDIT_ROWS[2], EDIT_ROWS[1]]  # 32 x 40, 48 x 32, 32 x 40
    assert trainer.prompt_cache.groups([r["prompt"] for r in rows], [[r["image"]] for r in rows]) == [[0, 2], [1]]
    model = trainer.model
    loss, kl = trainer.task_loss(model, "edit", rows, torch.Generator().manual_seed(3), backward=False)
    generator = torch.Generator().manual_seed(3)
    loss_a, kl_a = trainer.task_loss(model, "edit", [rows[0], rows[2]], generator, False, task_rows=3)
    loss_b, kl_b = trainer.task_loss(model, "edit", [rows[1]], generator, False, task_rows=3)
    torch.testing.assert_close(kl, (2 * kl_a + kl_b) / 3)
    assert loss == pytest.approx(loss_a + loss_b, rel=1e-6)
    assert (kl_a - kl_b).abs().max() > 0


def test_mixed_task_and_single_query_batches_group_rows_by_reference_size(tmp_path):
    """A mixed-task batch (`tasks_per_round`) and a single-query batch whose rows' references differ in size run as
    one batch per size: the loss is the sum of the groups' losses, each row weighted as in the whole batch
    (`_row_scales` of all its rows), the KL per step their row-weighted mean, the single-query MSE per row in order."""
    trainer = FLUX_KONTEXT.trainer(tmp_path, tasks_per_round=2, query_sigma_range="0,1")
    edit, style = EDIT_STYLE["edit"], EDIT_STYLE["style"]
    rows = [edit[0], style[1], edit[2], style[0]]  # references 32 x 40, 48 x 32, 48 x 32, 32 x 40
    tasks = ["edit", "style", "edit", "style"]
    assert trainer.prompt_cache.groups(*_split(rows)) == [[0, 3], [1, 2]]
    model = trainer.model
    steps = trainer.args.train_timesteps_for("edit")
    assert steps == trainer.args.train_timesteps_for("style") == 3
    scales = trainer._row_scales(tasks, torch.tensor([steps] * 4))
    assert scales.tolist() == pytest.approx([1 / 6] * 4)  # each task's weight over its 2 rows and 3 trained steps
    loss, kl = trainer.task_loss(model, "mixed", rows, torch.Generator().manual_seed(3), False, tasks)
    generator = torch.Generator().manual_seed(3)
    parts = [
        trainer.task_loss(model, "mixed", [rows[i] for i in g], generator, False, [tasks[i] for i in g], row_scales=s)
        for g, s in (([0, 3], scales[[0, 3]]), ([1, 2], scales[[1, 2]]))
    ]
    assert loss == pytest.approx(parts[0][0] + parts[1][0], rel=1e-6)
    torch.testing.assert_close(kl, (parts[0][1] + parts[1][1]) / 2)
    assert (parts[0][1] - parts[1][1]).abs().max() > 0

    loss, mse = trainer.single_query_loss(model, "edit", rows[:3], torch.Generator().manual_seed(5), False)
    generator = torch.Generator().manual_seed(5)
    first = trainer.single_query_loss(model, "edit", [rows[0]], generator, False, scales=torch.tensor([1 / 3]))
    second = trainer.single_query_loss(model, "edit", rows[1:3], generator, False, scales=torch.full((2,), 1 / 3))
    torch.testing.assert_close(mse, torch.cat([first[1], second[1]]))
    assert loss == pytest.approx(first[0] + second[0], rel=1e-6) and loss > 0


def _split(rows):
    return [row["prompt"] for row in rows], [[row["image"]] for row in rows]
