"""FLUX.1's own rules on the tiny FLUX pipeline: a teacher's guidance reaches the guidance embedding, and a
schnell-style model (no guidance embedding) samples with true CFG like `FluxPipeline` and trains. The contract every
family keeps (sampler, distillation, reload, card) is `tests/test_family_contract.py`."""

import dataclasses
import math

import pytest
import torch

from trl_diffusion_opd.teachers import parse_teacher_spec
from trl_diffusion_opd.testing import get_tiny_flux_pipeline

from helpers import FLUX, changed, snapshot


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A FLUX.1-dev-style trainer with two teachers (untrained: these rules need no training)."""
    return FLUX.trainer(tmp_path_factory.mktemp("flux"))


def test_teacher_guidance_reaches_the_guidance_embedding(trainer):
    assert trainer.family.uses_guidance_embedding
    transformer = trainer.pipeline.transformer
    spec = trainer.teacher_specs["geneval"][0]
    generator = torch.Generator().manual_seed(2)
    cond = trainer.prompt_cache(["a yellow star", "one dog"])
    x = torch.randn((2, 4, 16, 16), generator=generator)
    t = torch.tensor([0.9, 0.6])
    t_next = torch.tensor([0.7, 0.4])

    seen = []
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].shape[0], kwargs["guidance"].clone())),
        with_kwargs=True,
    )
    try:
        means = {
            g: trainer.teacher_means(dataclasses.replace(spec, guidance_scale=g), "geneval", x, t, t_next, cond, 0.7)
            for g in (1.0, 5.0)
        }
    finally:
        hook.remove()
    # One call per guidance value, no CFG batch doubling, and the spec's value is what the embedding receives.
    assert [(rows, guidance.tolist()) for rows, guidance in seen] == [(2, [1.0, 1.0]), (2, [5.0, 5.0])]
    assert (means[1.0] - means[5.0]).abs().max() > 1e-3

    # The mean is the ODE Euler step of the teacher's velocity at that guidance (teacher adapter active).
    with torch.no_grad(), trainer.adapters.use(spec.name):
        v = trainer.family.velocity(transformer, x, t, cond, 5.0)
    expected = x + (t_next - t).view(-1, 1, 1, 1) * v
    torch.testing.assert_close(means[5.0], expected, atol=1e-6, rtol=1e-6)

    # A dict spec's guidance_scale is parsed onto the spec the trainer uses.
    assert parse_teacher_spec("geneval", {"path": spec.path, "guidance_scale": 2}).guidance_scale == 2.0


def test_schnell_style_flux_trains_with_true_cfg(tmp_path):
    pipe = get_tiny_flux_pipeline(seed=0, guidance_embeds=False)
    teacher = {"path": FLUX.save_teachers(pipe, tmp_path, tasks=1)["geneval"], "guidance_scale": 2.0}
    trainer = FLUX.trainer(tmp_path, pipe, {"geneval": teacher}, max_steps=2, learning_rate=1e-2, guidance_scale=1.5)
    assert not pipe.transformer.config.guidance_embeds
    assert not trainer.family.uses_guidance_embedding

    # Without a guidance embedding, guidance is true CFG with the negative prompt, as FluxPipeline's true_cfg_scale.
    cond = trainer.prompt_cache(["a red circle"])
    negative = trainer.prompt_cache([""])
    x = trainer.family.init_latents(1, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=cond["prompt_embeds"],
            pooled_prompt_embeds=cond["pooled_prompt_embeds"],
            negative_prompt_embeds=negative["prompt_embeds"],
            negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"],
            true_cfg_scale=1.5,
            latents=trainer.family.pack_latents(x),
            num_inference_steps=4,
            height=32,
            width=32,
            output_type="latent",
        ).images
        sigmas = trainer.family.sigmas(4, 32)
        for j in range(4):
            v = trainer.family.velocity(pipe.transformer, x, sigmas[j].expand(1), cond, 1.5, negative)
            x = x + (sigmas[j + 1] - sigmas[j]) * v
    torch.testing.assert_close(trainer.family.pack_latents(x), expected, atol=1e-5, rtol=1e-5)

    before = snapshot(pipe.transformer)
    output = trainer.train()
    assert math.isfinite(output.training_loss) and output.training_loss > 0
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    moved = changed(pipe.transformer, before)
    student = {n for n, _ in pipe.transformer.named_parameters() if ".student." in n}
    assert moved and moved <= student
    assert any(".lora_B." in n for n in moved)
