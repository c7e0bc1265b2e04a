"""Z-Image's own rules on the tiny `ZImagePipeline`: CFG truncation and renormalisation follow the pipeline (from the
family's options and from the config's `family_kwargs`, with one-line errors for bad ones), padded prompt embeddings
give the pipeline's velocities, and training at CFG moves only the student. The contract every family keeps (sampler
at CFG `pos + w (pos - neg)`, KL, distillation, reload, card) is `tests/test_family_contract.py`."""

import math

import pytest
import torch

from trl_diffusion_opd import hub
from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.families.zimage import ZImageFamily
from trl_diffusion_opd.testing import get_tiny_zimage_pipeline

from helpers import ZIMAGE, offline_hub


MAX_LEN = ZIMAGE.args["max_sequence_length"]
CFG = 3.0  # ZImagePipeline's guidance_scale w: pos + w (pos - neg)


@pytest.fixture(scope="module", autouse=True)
def _offline_hub():
    # Saving writes a model card, which looks up the base's licence: the base id must not be looked up online.
    with offline_hub():
        yield


@pytest.fixture(scope="module")
def pipe():
    return ZIMAGE.build(seed=0)


def _captions(cond):
    return [e[m] for e, m in zip(cond["prompt_embeds"], cond["prompt_mask"])]


def test_cfg_truncation_and_renormalisation_follow_the_pipeline(pipe):
    plain = get_family(pipe, max_sequence_length=MAX_LEN)
    options = ZImageFamily(pipe, max_sequence_length=MAX_LEN, cfg_truncation=0.1, cfg_normalization=1.0)
    cond, negative = plain.encode_prompts(["a yellow star"]), plain.encode_prompts([""])
    x0 = plain.init_latents(1, 32, torch.Generator().manual_seed(3))
    sigmas = plain.sigmas(4, 32)
    # 1 - sigma = 0, 0.05, 0.14, 0.33: truncation at 0.1 keeps CFG for the first two steps only.
    assert ((1 - sigmas[:4]) <= 0.1).tolist() == [True, True, False, False]
    results = {}
    with torch.no_grad():
        for name, family in (("plain", plain), ("options", options)):
            x = x0
            for j in range(4):
                v = family.velocity(pipe.transformer, x, sigmas[j].expand(1), cond, CFG, negative)
                x = x + (sigmas[j + 1] - sigmas[j]) * v
            results[name] = x
        expected = pipe(
            prompt_embeds=_captions(cond),
            negative_prompt_embeds=_captions(negative),
            latents=x0,
            num_inference_steps=4,
            guidance_scale=CFG,
            cfg_truncation=0.1,
            cfg_normalization=True,
            height=32,
            width=32,
            output_type="latent",
        ).images
    torch.testing.assert_close(results["options"], expected, atol=1e-5, rtol=1e-5)
    assert (results["options"] - results["plain"]).abs().max() > 1e-2

    # Rows at different sigmas in one call get each its own rule: the same as one row at a time.
    x = torch.randn((2, 16, 16, 16), generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([1.0, 0.6])
    both, negative2 = plain.encode_prompts(["a yellow star", "one dog"]), plain.encode_prompts(["", ""])
    with torch.no_grad():
        batched = options.velocity(pipe.transformer, x, sigma, both, CFG, negative2)
        single = [
            options.velocity(
                pipe.transformer, x[i : i + 1], sigma[i : i + 1], plain.encode_prompts([p]), CFG, negative
            )
            for i, p in enumerate(["a yellow star", "one dog"])
        ]
    torch.testing.assert_close(batched, torch.cat(single), atol=1e-5, rtol=1e-5)

    # 0 < w <= 1 would need the negative prompt, which the trainer passes only above 1: a clear error.
    with pytest.raises(ValueError, match="guidance_scale 0"):
        plain.velocity(pipe.transformer, x, sigma, both, 0.5, None)


def test_cfg_options_from_the_config_reproduce_the_pipeline(tmp_path):
    """`family_kwargs` (here a JSON string, as on the command line) reaches the family: the trainer's rollout with
    CFG truncation and renormalisation gives `ZImagePipeline.__call__`'s latents with the same arguments, and the
    model card's quick start passes them."""
    options = '{"cfg_truncation": 0.1, "cfg_normalization": true}'
    trainer = ZIMAGE.trainer(tmp_path, guidance_scale=CFG, family_kwargs=options)
    pipe = trainer.pipeline
    assert trainer.args.family_kwargs == {"cfg_truncation": 0.1, "cfg_normalization": True}
    assert (trainer.family.cfg_truncation, trainer.family.cfg_normalization) == (0.1, 1.0)
    prompts = ["a yellow star", "the word dog"]
    rollout = trainer.rollout(trainer.prompt_cache(prompts), torch.Generator().manual_seed(0), guidance_scale=CFG)
    states = rollout["states"]
    call = {"latents": states[0], "num_inference_steps": 4, "guidance_scale": CFG, "height": 32, "width": 32}
    call.update(max_sequence_length=MAX_LEN, output_type="latent")
    with torch.no_grad():
        expected = pipe(prompts, cfg_truncation=0.1, cfg_normalization=True, **call).images
        default = pipe(prompts, **call).images
    torch.testing.assert_close(states[-1], expected, atol=1e-5, rtol=1e-5)
    assert (expected - default).abs().max() > 1e-2  # the options changed the result: the comparison pins them
    card = hub.create_model_card(trainer)
    assert "cfg_truncation=0.1," in card.text and "cfg_normalization=True," in card.text


def test_unknown_or_invalid_family_kwargs_are_one_clear_error(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"no option 'cfg_truncaton' for the zimage family .*: cfg_truncation, cfg_n"):
        get_family(pipe, {"cfg_truncaton": 0.5})
    with pytest.raises(ValueError, match="`cfg_normalization` must be a boolean or a number >= 0"):
        get_family(pipe, {"cfg_normalization": "yes"})
    with pytest.raises(ValueError, match="`family_kwargs` must be a dict"):
        ZIMAGE.config(tmp_path, family_kwargs="[1]")
    # The command line and YAML files give the dict .
    from trl_diffusion_opd.scripts import train as train_script

    (tmp_path / "recipe.yaml").write_text("family_kwargs: {cfg_truncation: 0.9, cfg_normalization: true}\n")
    flags = ["--model_name_or_path", "tiny:zimage", "--output_dir", str(tmp_path), "--prompts", '{"a": "x"}']
    flags += ["--teachers", '{"a": "b"}']
    _, from_yaml, _ = train_script.make_parser().parse_args_and_config(
        ["--config", str(tmp_path / "recipe.yaml")] + flags
    )
    assert from_yaml.family_kwargs == {"cfg_truncation": 0.9, "cfg_normalization": True}
    _, from_flag, _ = train_script.make_parser().parse_args_and_config(
        flags + ["--family_kwargs", '{"cfg_truncation": 0.5}']
    )
    assert from_flag.family_kwargs == {"cfg_truncation": 0.5}
    # A family without options (FLUX.2 [klein]) names none.
    from trl_diffusion_opd.testing import get_tiny_flux2_klein_pipeline

    with pytest.raises(ValueError, match=r"flux2_klein family \(Flux2KleinPipeline\); its options: size_from_image\."):
        get_family(get_tiny_flux2_klein_pipeline(seed=0), {"cfg_truncation": 0.5})


def test_padded_prompt_embeddings_give_the_pipeline_velocity(pipe):
    short, long = get_family(pipe, max_sequence_length=MAX_LEN), get_family(pipe, max_sequence_length=2 * MAX_LEN)
    prompts = ["one dog", "a yellow star on a blue sky with two cats"]
    cond, cond_long = short.encode_prompts(prompts), long.encode_prompts(prompts)
    alone = short.encode_prompts(prompts[:1])
    assert cond["prompt_embeds"].shape == (2, MAX_LEN, 16) and cond_long["prompt_embeds"].shape == (2, 2 * MAX_LEN, 16)
    lengths = cond["prompt_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] and cond["prompt_mask"][:, : lengths[0]].all()
    assert torch.equal(cond["prompt_embeds"][0, lengths[0] :], torch.zeros(MAX_LEN - lengths[0], 16))
    with torch.no_grad():  # the pipeline's own variable-length embeddings, row by row
        reference, _ = pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, max_sequence_length=MAX_LEN
        )
    for row, ref in zip(_captions(cond), reference):
        torch.testing.assert_close(row, ref, atol=1e-6, rtol=1e-6)

    x = torch.randn((2, 16, 16, 16), generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        v = short.velocity(pipe.transformer, x, sigma, cond)
        v_long = long.velocity(pipe.transformer, x, sigma, cond_long)
        v_alone = short.velocity(pipe.transformer, x[:1], sigma[:1], alone)
        raw = pipe.transformer(list(x.unsqueeze(2).unbind(0)), 1 - sigma, reference, return_dict=False)[0]
    torch.testing.assert_close(v_long, v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v_alone, v[:1], atol=1e-5, rtol=1e-5)
    # The family's velocity is the negated transformer output at timestep 1 - sigma.
    torch.testing.assert_close(v, -torch.stack(raw).squeeze(2), atol=1e-5, rtol=1e-5)


def test_zimage_trains_with_cfg(tmp_path):
    """Two rounds at the base model's CFG: finite losses and only the student's weights move."""
    pipe = get_tiny_zimage_pipeline(seed=1)
    trainer = ZIMAGE.trainer(tmp_path, pipe, ZIMAGE.save_teachers(pipe, tmp_path, tasks=1), guidance_scale=CFG)
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    output = trainer.train()
    assert math.isfinite(output.training_loss) and output.training_loss > 0
    changed = {n for n, p in pipe.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".student." in n for n in changed)
