"""Non-square sizes: `resolution` is a side or a height x width pair (`[32, 48]`, `"32x48"`), every family's rollout at
a non-square size gives the latents of its pipeline's `__call__` at that height and width, and images come out
height x width."""

import functools
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from peft import LoraConfig

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.sizes import format_resolution, image_size, parse_resolution
from trl_diffusion_opd.testing import (
    TINY_WAN_FRAMES,
    get_tiny_flux2_klein_pipeline,
    get_tiny_flux_pipeline,
    get_tiny_qwenimage_pipeline,
    get_tiny_sd3_pipeline,
    get_tiny_wan_pipeline,
    get_tiny_zimage_pipeline,
    save_toy_lora,
)


PROMPTS = ["a yellow star", "the word dog"]
STEPS = 3
# name: (tiny pipeline, (height, width), CFG scale > 1, max_sequence_length), sizes on each family's latent grid
FAMILIES = {
    "sd3": (functools.partial(get_tiny_sd3_pipeline, with_t5=False), (32, 48), 4.5, 1),
    "flux": (get_tiny_flux_pipeline, (32, 48), 3.5, 32),  # guidance embedding
    "flux2_klein": (get_tiny_flux2_klein_pipeline, (32, 48), 4.0, 48),
    "qwenimage": (get_tiny_qwenimage_pipeline, (32, 48), 4.0, 32),
    "zimage": (get_tiny_zimage_pipeline, (32, 48), 3.0, 64),
    "wan": (get_tiny_wan_pipeline, (32, 48), 5.0, 16),
    "wan22_ti2v": (functools.partial(get_tiny_wan_pipeline, ti2v=True), (64, 96), 5.0, 16),  # per-token timesteps
}


def _trainer(tmp_path, pipe, size, guidance, seq) -> DiffusionOPDTrainer:
    targets = get_family(pipe).default_lora_targets
    teacher = save_toy_lora(pipe, tmp_path / "teacher", seed=1, rank=2, target_modules=targets)
    video = {"num_frames": TINY_WAN_FRAMES} if hasattr(pipe, "vae_scale_factor_temporal") else {}
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"),
        resolution=list(size),
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        max_sequence_length=seq,
        ema=False,
        report_to="none",
        **video,
    )
    # A student LoRA that is not zero, so that the pipeline (which runs the active student adapter) is not the base.
    student = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets)
    return DiffusionOPDTrainer(pipe, {"a": str(teacher)}, args=args, train_dataset={"a": PROMPTS}, peft_config=student)


def _pipeline_latents(name, trainer, x0, size, guidance, seq):
    """`__call__` of the family's pipeline at `size` from the initial latents `x0`, in the rollout's layout."""
    pipe, family = trainer.pipeline, trainer.family
    height, width = size
    call = {"num_inference_steps": STEPS, "height": height, "width": width, "output_type": "latent"}
    cond, negative = trainer.prompt_cache(PROMPTS), trainer._negative(len(PROMPTS))
    with torch.no_grad():
        if name == "sd3":
            out = pipe(
                prompt_embeds=cond["prompt_embeds"],
                pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                negative_prompt_embeds=negative["prompt_embeds"],
                negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"],
                latents=x0,
                guidance_scale=guidance,
                max_sequence_length=seq,
                **call,
            ).images
            return out, lambda x: x
        if name == "flux":
            out = pipe(
                prompt_embeds=cond["prompt_embeds"],
                pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                latents=family.pack_latents(x0),
                guidance_scale=guidance,
                **call,
            ).images
            return out, family.pack_latents
        if name == "qwenimage":
            guide = family.pipeline_guidance_kwargs(guidance, trainer.args.negative_prompt)
            out = pipe(PROMPTS, latents=family.pack_latents(x0), max_sequence_length=seq, **guide, **call).images
            return out, family.pack_latents
        if name == "flux2_klein":
            out = pipe(prompt=PROMPTS, latents=x0, guidance_scale=guidance, max_sequence_length=seq, **call).images
            return out, family.vae_latents
        if name == "zimage":
            out = pipe(PROMPTS, latents=x0, guidance_scale=guidance, max_sequence_length=seq, **call).images
            return out, lambda x: x
        # Wan: the family's sampler is the flow-matching Euler step at the model's shift.
        scheduler = pipe.scheduler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=scheduler.config.flow_shift)
        try:
            out = pipe(
                prompt_embeds=cond["prompt_embeds"],
                negative_prompt_embeds=negative["prompt_embeds"],
                latents=x0,
                guidance_scale=guidance,
                num_frames=TINY_WAN_FRAMES,
                **call,
            ).frames
        finally:
            pipe.scheduler = scheduler
        return out, lambda x: x


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rollout_at_a_non_square_size_reproduces_the_pipeline(tmp_path, name):
    """The trainer's ODE rollout (noise level 0) at CFG > 1 and height != width gives the pipeline's latents at that
    height and width from the same noise: latent grid, image ids / position ids, the shift of the schedule by the
    image's token count (FLUX, FLUX.2, Qwen-Image, Z-Image) and decoding all follow the two sides."""
    build, size, guidance, seq = FAMILIES[name]
    trainer = _trainer(tmp_path, build(seed=0), size, guidance, seq)
    assert trainer.args.resolution == size
    states = trainer.rollout(trainer.prompt_cache(PROMPTS), torch.Generator().manual_seed(0))["states"]
    # Every family's latents end in (latent height, latent width): 2 : 3 here, the image's aspect.
    assert states.shape[-2] * 3 == states.shape[-1] * 2
    expected, layout = _pipeline_latents(name, trainer, states[0], size, guidance, seq)
    torch.testing.assert_close(layout(states[-1]), expected, atol=1e-5, rtol=1e-5)
    assert (states[-1] - states[0]).abs().max() > 0.1

    samples = trainer.generate(PROMPTS[:1], adapter=None, num_inference_steps=2)
    image = samples[0][0] if isinstance(samples[0], list) else samples[0]
    assert image.size == (size[1], size[0])  # PIL: (width, height)


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
