"""Qwen-Image-2.1 (`QwenImage21Pipeline`)'s own rules, on the tiny pipeline. The family contract
(`tests/test_family_contract.py`, rows `qwenimage21` and `qwenimage21_t2i`) checks the rollout with one condition
image and without, the KLs of a text-to-image and an editing teacher distilled into one student, reload, image
dependence and the card."""

import pytest
import torch

from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.testing import get_tiny_input_image, get_tiny_qwenimage21_pipeline

from helpers import QWEN21_IMAGES


SIZE = (64, 96)
GUIDANCE = 4.0


@pytest.fixture(scope="module")
def pipe():
    return get_tiny_qwenimage21_pipeline(seed=0)


def _family(pipe, **options):
    return get_family(pipe, {"output_resolution": 64, **options}, max_sequence_length=64)


def _sample(family, cond, negative, x0, sigmas, guidance=GUIDANCE):
    """The trainer's deterministic sampler: Euler steps of the family's velocity."""
    x = x0
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            v = family.velocity(family.transformer, x, sigmas[i : i + 1].repeat(len(x)), cond, guidance, negative)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def _pipeline(pipe, prompt, x0, steps, **kwargs):
    out = pipe(
        prompt, latents=x0.flatten(2).transpose(1, 2), num_inference_steps=steps, output_type="latent", **kwargs
    )
    return out.images.transpose(1, 2).reshape(x0.shape)


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_two_condition_images_reproduce_the_pipeline(pipe, use_kv_cache):
    """Two condition images of other layouts (64 x 64 and 32 x 96 conditions: `img_shapes` [4x4, 2x6, 4x6]) at true
    CFG 4 and 64 x 96: the family's sampler gives `__call__(image=[a, b])`'s latents, with the pipeline's KV cache of
    the condition or without (the family recomputes it every pass)."""
    family = _family(pipe)
    images = [QWEN21_IMAGES[0], QWEN21_IMAGES[2]]
    cond = family.encode_prompts(["make it red"], [images])
    assert cond["condition_shapes"].tolist() == [[[4, 4], [2, 6]]]
    negative = family.encode_negative(" ", [images])
    x0 = family.init_latents(1, SIZE, torch.Generator().manual_seed(0))
    rollout = _sample(family, cond, negative, x0, family.sigmas(3, SIZE))
    call = {"true_cfg_scale": GUIDANCE, "negative_prompt": " ", "height": SIZE[0], "width": SIZE[1]}
    expected = _pipeline(
        pipe, "make it red", x0, 3, image=images, output_resolution=64, use_kv_cache=use_kv_cache, **call
    )
    torch.testing.assert_close(rollout, expected, atol=1e-5, rtol=1e-5)
    # the second image matters: one image gives other latents
    single = _pipeline(pipe, "make it red", x0, 3, image=images[:1], output_resolution=64, **call)
    assert (single - expected).abs().max() > 1e-2


def test_rows_of_other_prompt_lengths_batch_as_each_alone(pipe):
    """The transformer's RoPE advances on every text position, padding included: rows of other prompt lengths run in
    separate calls inside `velocity`, so a batch (CFG's negative rows included) gives each row's velocity alone."""
    family = _family(pipe)
    cond = family.encode_prompts(["a", "a much longer prompt", "b"])
    assert cond["prompt_embeds_mask"].sum(1).tolist()[0] < cond["prompt_embeds_mask"].sum(1).tolist()[1]
    negative = family.encode_prompts([" "]).copy()
    negative = {k: v.repeat(3, *[1] * (v.ndim - 1)) for k, v in negative.items()}
    x = family.init_latents(3, SIZE, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        batch = family.velocity(pipe.transformer, x, sigma, cond, GUIDANCE, negative)
        alone = [
            family.velocity(
                pipe.transformer,
                x[i : i + 1],
                sigma[i : i + 1],
                {k: v[i : i + 1] for k, v in cond.items()},
                GUIDANCE,
                {k: v[:1] for k, v in negative.items()},
            )
            for i in range(3)
        ]
    torch.testing.assert_close(batch, torch.cat(alone), atol=1e-6, rtol=1e-5)


def test_true_cfg_has_no_norm_rescale(pipe):
    """Guidance is `v_n + g (v_c − v_n)` as the pipeline's, without Qwen-Image's per-token norm rescale."""
    family = _family(pipe)
    cond, negative = family.encode_prompts(["two cats"]), family.encode_prompts([" "])
    x = family.init_latents(1, SIZE, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        guided = family.velocity(pipe.transformer, x, sigma, cond, GUIDANCE, negative)
        v_cond = family.velocity(pipe.transformer, x, sigma, cond)
        v_negative = family.velocity(pipe.transformer, x, sigma, negative)
    assert (v_cond - v_negative).abs().max() > 5e-4  # measured 1.6e-3: the prompts differ, so would a rescale
    torch.testing.assert_close(guided, v_negative + GUIDANCE * (v_cond - v_negative), atol=1e-6, rtol=1e-5)


def test_sample_sigmas_fix_the_schedule(pipe):
    """A pipeline config with `sample_sigmas` samples with them whatever `num_inference_steps` says: the family uses
    them (shifted by the image's tokens) and refuses another step count in one line."""
    pipe = get_tiny_qwenimage21_pipeline(seed=0)
    pipe.register_to_config(sample_sigmas=[1.0, 0.7, 0.3])
    family = _family(pipe)
    cond, negative = family.encode_prompts(["a red circle"]), family.encode_prompts([" "])
    x0 = family.init_latents(1, SIZE, torch.Generator().manual_seed(0))
    sigmas = family.sigmas(3, SIZE)
    assert sigmas.shape == (4,) and sigmas[0] == 1 and sigmas[-1] == 0
    # shifted by the scheduler (`mu` of 24 tokens), the last stretched to its `shift_terminal` 0.02
    assert abs(sigmas[1].item() - 0.7) > 1e-2 and sigmas[2].item() == pytest.approx(0.02)
    expected = _pipeline(
        pipe, "a red circle", x0, 10, true_cfg_scale=GUIDANCE, negative_prompt=" ", height=SIZE[0], width=SIZE[1]
    )
    torch.testing.assert_close(_sample(family, cond, negative, x0, sigmas), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"its 3 `sample_sigmas`; set num_inference_steps=3 \(got 4\)"):
        family.sigmas(4, SIZE)


def test_size_from_image_is_the_pipelines_default_size(pipe):
    """With `size_from_image` a row's output size is `output_resolution`² at the last image's aspect, the size
    `__call__` samples at without `height` / `width`; the pipeline's side floors to multiples of 32."""
    family = _family(pipe, size_from_image=True)
    image = get_tiny_input_image(5, 30, 70)
    cond = family.encode_prompts(["add a hat"], [[QWEN21_IMAGES[0], image]])
    height, width = family.output_resolution(cond)
    assert (height, width) == (32, 96)
    out = pipe("add a hat", image=[QWEN21_IMAGES[0], image], output_resolution=64, num_inference_steps=2,
               output_type="latent").images  # fmt: skip
    assert out.shape[1] == (height // 16) * (width // 16)
    assert _family(pipe).output_resolution(cond) is None  # the config's resolution by default
    assert _family(pipe).resolution_multiple == 32


def test_the_condition_is_recomputed_with_gradients(pipe):
    """No KV cache in training: the condition tokens go through every pass, so the loss reaches them (and the
    student's LoRA on their keys and values)."""
    family = _family(pipe)
    cond = family.encode_prompts(["make it red"], [[QWEN21_IMAGES[1]]])
    conditions = cond["condition_latents"].clone().requires_grad_(True)
    x = family.init_latents(1, SIZE, torch.Generator().manual_seed(0))
    v = family.velocity(pipe.transformer, x, torch.tensor([0.5]), {**cond, "condition_latents": conditions})
    (grad,) = torch.autograd.grad(v.square().sum(), conditions)
    assert grad.abs().max() > 1e-6


def test_bad_options_and_long_prompts_are_one_line_errors(pipe):
    with pytest.raises(ValueError, match=r"`output_resolution` of the qwenimage21 family must be a side >= 32, got 8"):
        _family(pipe, output_resolution=8)
    with pytest.raises(ValueError, match=r"`size_from_image` of the qwenimage21 family must be true or false"):
        _family(pipe, size_from_image="yes")
    family = get_family(pipe, max_sequence_length=16)
    with pytest.raises(ValueError, match=r"tokens long, more than max_sequence_length=16; raise it"):
        family.encode_prompts(["a prompt much longer than sixteen tokens"])
    with pytest.raises(ValueError, match=r"the qwenimage21 family \(QwenImage21Pipeline\) takes at most 3"):
        _family(pipe).encode_prompts(["x"], [[QWEN21_IMAGES[0]] * 4])


def test_eval_samples_with_the_pipelines_own_arguments(pipe):
    """`generate_images` (the `eval` command's sampler) calls the pipeline with `true_cfg_scale` and without
    `max_sequence_length`, which `QwenImage21Pipeline.__call__` does not take, for text rows and image rows alike."""
    from trl_diffusion_opd.evaluation import generate_images

    common = {
        "num_inference_steps": 2,
        "guidance_scale": GUIDANCE,
        "resolution": list(SIZE),
        "max_sequence_length": 64,
    }
    text = generate_images(pipe, ["two cats"], [3], **common)
    expected = pipe("two cats", true_cfg_scale=GUIDANCE, negative_prompt="", height=SIZE[0], width=SIZE[1],
                    num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images  # fmt: skip
    assert text[0].size == (SIZE[1], SIZE[0])
    assert list(text[0].getdata()) == list(expected[0].getdata())
    edited = generate_images(pipe, ["make it red"], [3], images=[[QWEN21_IMAGES[0]]], **common)
    assert edited[0].size == (SIZE[1], SIZE[0]) and list(edited[0].getdata()) != list(text[0].getdata())
