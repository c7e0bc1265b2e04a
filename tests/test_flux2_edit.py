"""FLUX.2 [klein] with several reference images a row (`Flux2KleinPipeline(image=[...])`): the rollout reproduces the
pipeline with two references at CFG > 1 and a non-square size. The family contract (`tests/test_family_contract.py`,
row `flux2_klein_edit`) checks one reference a row and one student learning a text-to-image teacher and an editing
teacher at once (rows without an image are text-to-image rows): KLs, reload, image dependence, the card's task
kinds."""

import torch

from helpers import FLUX2_KLEIN_EDIT, KLEIN_IMAGES


IMAGES = KLEIN_IMAGES  # 64 x 64, 64 x 96, 64 x 64: the pipeline's smallest reference side is 64
GUIDANCE = 4.0  # klein base's CFG default
SEQ = 48


def test_rollout_reproduces_klein_pipeline_with_several_references(tmp_path):
    """At noise level 0, CFG 4 and 32 x 48 output, the rollout with two references (64 x 64 and 64 x 96) gives
    `Flux2KleinPipeline.__call__(image=[...])`'s latents from the same noise: references cropped, encoded, packed and
    appended with time ids 10 and 20, the negative ("") branch keeping them."""
    trainer = FLUX2_KLEIN_EDIT.trainer(
        tmp_path,
        student={"r": 4, "lora_alpha": 4, "init_lora_weights": False},
        resolution=[32, 48],
        num_inference_steps=3,
    )
    pipe = trainer.pipeline
    prompts, references = ["make it red", "add a hat"], [IMAGES[0], IMAGES[1]]
    cond = trainer.prompt_cache(prompts, [references, references])
    assert cond["image_latents"].shape == (2, 16 * 16 + 16 * 24, 16)
    assert cond["image_ids"][0, :, 0].unique().tolist() == [10, 20]
    states = trainer.rollout(cond, torch.Generator().manual_seed(0))["states"]
    assert states.shape == (4, 2, 16, 8, 12)
    family = trainer.family
    call = {"prompt": prompts, "latents": states[0], "guidance_scale": GUIDANCE, "max_sequence_length": SEQ}
    call.update(num_inference_steps=3, height=32, width=48, output_type="latent")
    with torch.no_grad():
        expected = pipe(image=references, **call).images
        one_reference = pipe(image=references[:1], **call).images
    torch.testing.assert_close(family.vae_latents(states[-1]), expected, atol=1e-5, rtol=1e-5)
    assert (expected - one_reference).abs().max() > 1e-2  # the second reference changed the result
