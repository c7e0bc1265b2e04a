"""Qwen-Image's own rules on the tiny `QwenImagePipeline`: true CFG with its norm rescale (which plain CFG is not), a
guidance scale of 1 as the pipeline without a negative prompt, padded prompt embeddings that do not change the
velocity, a deterministic registered tiny pipeline and a valid example recipe. The contract every family keeps
(sampler, KL, distillation, reload, card) is `tests/test_family_contract.py`."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from trl_diffusion_opd import DiffusionOPDConfig
from trl_diffusion_opd.families.base import cond_cat
from trl_diffusion_opd.testing import TINY_PIPELINES, get_tiny_qwenimage_pipeline

from helpers import QWENIMAGE


TRUE_CFG = 4.0  # Qwen-Image's default `true_cfg_scale`
NEGATIVE = " "  # the negative prompt of Qwen-Image's README
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A trainer with a diffusers-format and a PEFT-format teacher (untrained: these rules need no training)."""
    assert QWENIMAGE.args["guidance_scale"] == TRUE_CFG and QWENIMAGE.args["negative_prompt"] == NEGATIVE
    # A student that is not zero, so that the pipeline (which runs the active student adapter) is not the base.
    return QWENIMAGE.trainer(tmp_path_factory.mktemp("qwenimage"), student={"init_lora_weights": False})


def test_rollout_reproduces_the_true_cfg_norm_rescale(trainer):
    """Through the trainer's rollout, the family's sigmas (exponential dynamic shift, terminal stretch), packing,
    timestep convention, prompt encoding and true CFG with the norm rescale give the latents
    `QwenImagePipeline.__call__` gives from the same initial noise, prompts and negative prompt."""
    pipe = trainer.pipeline
    prompts = ["a yellow star", "the word dog"]
    cond = trainer.prompt_cache(prompts)
    # Rows of different lengths: the cached rows are padded, the pipeline pads to the longest prompt only.
    lengths = cond["prompt_embeds_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1] and cond["prompt_embeds"].shape[1] == MAX_LENGTH

    def pipeline_latents(x0, **kwargs):
        with torch.no_grad():  # the pipeline runs the student adapter, which is the active one
            return pipe(
                prompts,
                latents=trainer.family.pack_latents(x0),
                num_inference_steps=4,
                height=32,
                width=32,
                output_type="latent",
                **kwargs,
            ).images

    rollout = trainer.rollout(cond, torch.Generator().manual_seed(0))
    states = rollout["states"]
    assert states.shape == (5, 2, 4, 8, 8)  # (N + 1, B, 4 channels, 32 / 4, 32 / 4); packed in `velocity`
    pack = trainer.family.pack_latents
    # What the model card's quick start passes: true_cfg_scale and the negative prompt.
    guidance = trainer.family.pipeline_guidance_kwargs(TRUE_CFG, NEGATIVE)
    assert guidance == {"true_cfg_scale": TRUE_CFG, "negative_prompt": NEGATIVE}
    expected = pipeline_latents(states[0], max_sequence_length=MAX_LENGTH, **guidance)
    assert expected.shape == (2, 16, 16)  # (B, (32 / 4 / 2)^2 packed tokens, 4 channels x 2 x 2)
    torch.testing.assert_close(pack(states[-1]), expected, atol=1e-5, rtol=1e-5)
    assert (states[-1] - states[0]).abs().max() > 0.1

    # Plain CFG without the rescale would be another sampler: the rescale is what the pipeline does.
    family, sigmas = trainer.family, rollout["sigmas"]
    negative = trainer._negative(2)
    x = states[0]
    with torch.no_grad():
        for j in range(4):
            sigma = sigmas[j].expand(2)
            v = family.cfg_velocity(
                lambda *a: family.velocity(pipe.transformer, *a), x, sigma, cond, negative, TRUE_CFG
            )
            x = x + (sigmas[j + 1] - sigmas[j]) * v
    assert (pack(x) - expected).abs().max() > 1e-2

    # guidance_scale 1 is the pipeline called without a negative prompt (its true CFG is then off, even at 4.0).
    plain = trainer.rollout(cond, torch.Generator().manual_seed(0), guidance_scale=1.0)["states"]
    torch.testing.assert_close(plain[0], states[0])
    expected = pipeline_latents(states[0], true_cfg_scale=TRUE_CFG, max_sequence_length=MAX_LENGTH)
    torch.testing.assert_close(pack(plain[-1]), expected, atol=1e-5, rtol=1e-5)

    images = family.decode(states[-1], 32)
    assert len(images) == 2 and images[0].size == (32, 32)


def test_padding_does_not_change_the_velocity(trainer):
    """Cached rows are zero-padded to `max_sequence_length`; the mask keeps the padding out of the attention, so a
    row's velocity is the same alone, batched with a longer prompt, or given to the transformer unpadded."""
    family, transformer = trainer.family, trainer.pipeline.transformer
    short, long = trainer.prompt_cache(["one dog"]), trainer.prompt_cache(["a yellow star"])
    n_short, n_long = int(short["prompt_embeds_mask"].sum()), int(long["prompt_embeds_mask"].sum())
    assert n_short < n_long < MAX_LENGTH
    assert short["prompt_embeds"][0, n_short:].abs().max() == 0
    x = family.init_latents(2, 32, torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        together = family.velocity(transformer, x, sigma, cond_cat([short, long]), TRUE_CFG, trainer._negative(2))
        alone_short = family.velocity(transformer, x[:1], sigma[:1], short, TRUE_CFG, trainer._negative(1))
        alone_long = family.velocity(transformer, x[1:], sigma[1:], long, TRUE_CFG, trainer._negative(1))
        # The transformer itself, given all 32 columns with the mask, against the prompt's own tokens only.
        kwargs = {
            "hidden_states": family.pack_latents(x[:1]),
            "timestep": sigma[:1],
            "img_shapes": [[(1, 4, 4)]],
            "return_dict": False,
        }
        padded = transformer(
            encoder_hidden_states=short["prompt_embeds"],
            encoder_hidden_states_mask=short["prompt_embeds_mask"],
            **kwargs,
        )[0]
        exact = transformer(encoder_hidden_states=short["prompt_embeds"][:, :n_short], **kwargs)[0]
        unmasked = transformer(encoder_hidden_states=short["prompt_embeds"], **kwargs)[0]
    torch.testing.assert_close(padded, exact, atol=1e-6, rtol=1e-5)
    assert (unmasked - exact).abs().max() > 1e-4  # without the mask the padding would leak in
    torch.testing.assert_close(together[:1], alone_short, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(together[1:], alone_long, atol=1e-6, rtol=1e-5)


def test_tiny_qwenimage_pipeline_is_registered_and_deterministic():
    assert TINY_PIPELINES["qwenimage"] is get_tiny_qwenimage_pipeline
    a, b = get_tiny_qwenimage_pipeline(seed=0), get_tiny_qwenimage_pipeline(seed=0)
    c = get_tiny_qwenimage_pipeline(seed=1)
    for name in ("transformer", "text_encoder", "vae"):
        pa, pb, pc = (dict(p.components[name].named_parameters()) for p in (a, b, c))
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
        assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    # The tokenizer splits the template like Qwen's: the 34 dropped tokens are exactly the system prefix.
    template = a.prompt_template_encode
    ids = a.tokenizer(template.format("a dog")).input_ids
    kept = a.tokenizer.decode(ids[a.prompt_template_encode_start_idx :])
    assert kept == "a dog<|im_end|>\n<|im_start|>assistant\n"


def test_example_config_is_a_valid_qwen_image_recipe(tmp_path):
    config = yaml.safe_load((Path(__file__).parents[1] / "examples" / "configs" / "qwenimage.yaml").read_text())
    fields = {f.name for f in dataclasses.fields(DiffusionOPDConfig)}
    assert set(config) - fields == {
        "model_name_or_path",
        "lora_r",
        "lora_alpha",
        "teachers",
        "prompts",
        "eval_prompts",
    }
    assert config["model_name_or_path"] == "Qwen/Qwen-Image"
    args = DiffusionOPDConfig(**{**{k: v for k, v in config.items() if k in fields}, "output_dir": str(tmp_path)})
    assert (args.guidance_scale, args.negative_prompt, args.resolution, args.num_inference_steps) == (
        4.0,
        " ",
        512,
        10,
    )
    assert args.max_sequence_length == 128 and args.gradient_checkpointing
