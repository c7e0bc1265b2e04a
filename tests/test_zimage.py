"""Z-Image students and teachers on the tiny `ZImagePipeline`: the family reproduces the pipeline's sampler (its
1 − sigma timestep, negated output, CFG `pos + w (pos − neg)`, truncation and renormalisation), padded prompt
embeddings give the pipeline's velocities, the trainer distils a diffusers-format and a PEFT-format teacher, the KL
to a teacher equal to the student is 0, the saved student reloads with `ZImagePipeline.load_lora_weights`, and the
model card names the base and the family."""

import math

import pytest
import torch
from huggingface_hub import constants as hub_constants
from peft import LoraConfig

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer, hub
from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.families.zimage import ZImageFamily
from trl_diffusion_opd.testing import TINY_PIPELINES, get_tiny_zimage_pipeline, save_toy_lora


TARGETS = ZImageFamily.default_lora_targets
TRAIN_PROMPTS = {
    "geneval": ["a red circle", "a blue square", "two cats", "a green tree"],
    "ocr": ["the word cat", "a sign hi", "text abc", "a poster"],
}
EVAL_PROMPTS = {"geneval": ["a yellow star", "one dog"], "ocr": ["the word dog", "a label"]}
MAX_LEN = 64  # prompt tokens: the tiny byte-level tokenizer plus the chat template fit in 64
CFG = 3.0  # ZImagePipeline's guidance_scale w: pos + w (pos - neg)


def _args(output_dir, **kwargs) -> DiffusionOPDConfig:
    defaults = {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "ema": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "max_sequence_length": MAX_LEN,
        "resolution": 32,
        "num_inference_steps": 4,
        # Z-Image-Turbo's setting (no CFG), which halves the cost of the distillation; CFG is pinned below.
        "guidance_scale": 0.0,
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


def _teacher(pipe, folder, seed: int, format: str = "diffusers") -> str:
    # Teachers share most of their update (see tests/test_flux.py); one diffusers-format, one PEFT-format.
    path = save_toy_lora(
        pipe,
        folder,
        seed=seed,
        std=0.1,
        rank=2,
        shared_seed=7,
        specific_scale=0.3,
        target_modules=TARGETS,
        format=format,
    )
    return str(path)


def _student_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS)


def _pipe():
    # One main layer (plus the two refiners) keeps the 60 distillation rounds within the time budget.
    return get_tiny_zimage_pipeline(seed=0, n_layers=1)


@pytest.fixture(scope="module", autouse=True)
def _offline_hub():
    # Saving writes a model card, which looks up the base's licence: the base id must not be looked up online.
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        hub.base_license.cache_clear()
        yield
    hub.base_license.cache_clear()


def _captions(cond):
    return [e[m] for e, m in zip(cond["prompt_embeds"], cond["prompt_mask"])]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A student distilled from two teachers: `(trainer, kl_before, kl_after, params_before)`."""
    tmp = tmp_path_factory.mktemp("zimage")
    # Measured with lr 1e-2 and 60 rounds over trainer seeds s = 0 / 1 / 2 (teacher seeds 1 + 10 s and 2 + 10 s):
    # the KL fell by 86.9% or more to each teacher.
    pipe = _pipe()
    pipe.register_to_config(_name_or_path="Tongyi-MAI/Z-Image")
    teachers = {
        "geneval": _teacher(pipe, tmp / "geneval", 1),
        "ocr": _teacher(pipe, tmp / "ocr", 2, format="peft"),
    }
    trainer = DiffusionOPDTrainer(
        pipe,
        teachers,
        args=_args(tmp / "out", max_steps=60, seed=0),
        train_dataset=TRAIN_PROMPTS,
        peft_config=_student_config(),
    )
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    torch.set_num_threads(1)  # the autouse fixture runs after module fixtures
    kl_before = trainer.compute_teacher_kl(EVAL_PROMPTS, use_ema=False)
    trainer.train()
    kl_after = trainer.compute_teacher_kl(EVAL_PROMPTS, use_ema=False)
    return trainer, kl_before, kl_after, before


def test_distillation_lowers_kl_to_each_zimage_teacher(distilled):
    trainer, kl_before, kl_after, before = distilled
    assert trainer.family.name == "zimage" and TINY_PIPELINES["zimage"] is get_tiny_zimage_pipeline
    assert kl_before.keys() == kl_after.keys() == {"geneval", "ocr"}
    for task in kl_before:
        assert kl_before[task] > 1e-6, f"teacher '{task}' equals the base: nothing to distil"
        reduction = 1 - kl_after[task] / kl_before[task]
        assert reduction >= 0.8, f"KL to '{task}' fell by {reduction:.1%} only"
    transformer = trainer.pipeline.transformer
    changed = {n for n, p in transformer.named_parameters() if not torch.equal(p, before[n])}
    student = {n for n, _ in transformer.named_parameters() if ".student." in n}
    assert changed and changed <= student
    assert {n for n in changed if ".lora_B." in n} == {n for n in student if ".lora_B." in n}


def test_rollout_reproduces_zimage_pipeline_with_cfg(distilled):
    """With noise level 0 the trainer's rollout at CFG w = 3 gives `ZImagePipeline.__call__`'s latents from the same
    noise and prompts (encoded by the pipeline itself): schedule, timestep 1 − sigma, sign and CFG rule."""
    trainer, *_ = distilled
    pipe = trainer.pipeline
    prompts = ["a yellow star", "the word dog"]
    rollout = trainer.rollout(trainer.prompt_cache(prompts), torch.Generator().manual_seed(0), guidance_scale=CFG)
    states = rollout["states"]
    assert states.shape == (5, 2, 16, 16, 16)  # (N + 1, B, 16 channels, 32 px / 2)
    torch.testing.assert_close(rollout["sigmas"][[0, -1]], torch.tensor([1.0, 0.0]))
    with torch.no_grad():  # the pipeline runs the student adapter, the active one
        expected = pipe(
            prompts,
            latents=states[0],
            num_inference_steps=4,
            guidance_scale=CFG,
            height=32,
            width=32,
            max_sequence_length=MAX_LEN,
            output_type="latent",
        ).images
        unguided = trainer.rollout(trainer.prompt_cache(prompts), torch.Generator().manual_seed(0), guidance_scale=0)
    torch.testing.assert_close(states[-1], expected, atol=1e-5, rtol=1e-5)
    assert (states[-1] - unguided["states"][-1]).abs().max() > 0.1  # guidance mattered
    images = trainer.family.decode(states[-1], 32)
    assert len(images) == 2 and images[0].size == (32, 32)


def test_cfg_truncation_and_renormalisation_follow_the_pipeline(distilled):
    trainer, *_ = distilled
    pipe = trainer.pipeline
    plain = trainer.family
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
    pipe = _pipe()
    teacher = _teacher(pipe, tmp_path / "teacher", 1)
    options = '{"cfg_truncation": 0.1, "cfg_normalization": true}'
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": teacher},
        args=_args(tmp_path / "out", guidance_scale=CFG, family_kwargs=options),
        train_dataset={"geneval": TRAIN_PROMPTS["geneval"]},
        peft_config=_student_config(),
    )
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


def test_unknown_or_invalid_family_kwargs_are_one_clear_error(tmp_path):
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"no option 'cfg_truncaton' for the zimage family .*: cfg_truncation, cfg_n"):
        get_family(pipe, {"cfg_truncaton": 0.5})
    with pytest.raises(ValueError, match="`cfg_normalization` must be a boolean or a number >= 0"):
        get_family(pipe, {"cfg_normalization": "yes"})
    with pytest.raises(ValueError, match="`family_kwargs` must be a dict"):
        _args(tmp_path, family_kwargs="[1]")
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

    with pytest.raises(ValueError, match=r"flux2_klein family \(Flux2KleinPipeline\); its options: none"):
        get_family(get_tiny_flux2_klein_pipeline(seed=0), {"cfg_truncation": 0.5})


def test_padded_prompt_embeddings_give_the_pipeline_velocity(distilled):
    trainer, *_ = distilled
    pipe = trainer.pipeline
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


def test_kl_is_zero_when_the_teacher_is_the_student(distilled, tmp_path):
    trainer, *_ = distilled
    trainer.save_model(str(tmp_path / "student"))
    pipe = _pipe()
    other = _teacher(pipe, tmp_path / "other", 3)
    same = DiffusionOPDTrainer(
        pipe,
        {"geneval": str(tmp_path / "student"), "ocr": other},
        args=_args(tmp_path / "out", student_adapter=str(tmp_path / "student"), guidance_scale=CFG),
        train_dataset=TRAIN_PROMPTS,
    )
    kl = same.compute_teacher_kl(EVAL_PROMPTS, use_ema=False)
    assert kl["geneval"] == 0.0
    assert kl["ocr"] > 1e-6


def test_saved_zimage_student_reloads_with_load_lora_weights(distilled, tmp_path):
    trainer, *_ = distilled
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()

    fresh = _pipe()
    family = get_family(fresh, max_sequence_length=MAX_LEN)
    cond = family.encode_prompts(["a yellow star", "the word dog", "one dog"])
    negative = family.encode_prompts(["", "", ""])
    x = torch.randn((3, 16, 16, 16), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        base = family.velocity(fresh.transformer, x, sigma, cond, CFG, negative)
        fresh.load_lora_weights(str(tmp_path / "adapter"))
        reloaded = family.velocity(fresh.transformer, x, sigma, cond, CFG, negative)
        student = trainer.family.velocity(trainer.pipeline.transformer, x, sigma, cond, CFG, negative)
    assert (student - base).abs().max() > 1e-3, "the student equals the base: the comparison would be vacuous"
    assert (reloaded - student).abs().max() <= 1e-5
    adapted = {n.split(".lora_A.")[0] for n, _ in fresh.transformer.named_parameters() if ".lora_A." in n}
    student_modules = {n.split(".lora_A.")[0] for n in trainer.student_state_dict() if ".lora_A." in n}
    assert adapted == student_modules
    assert {m.split(".")[0] for m in adapted} == {"layers", "noise_refiner", "context_refiner"}
    assert any(m.endswith("feed_forward.w2") for m in adapted)


def test_zimage_model_card_names_base_and_tags(distilled):
    trainer, *_ = distilled
    card = hub.create_model_card(trainer)
    data = card.data.to_dict()
    assert data["base_model"] == "Tongyi-MAI/Z-Image"
    assert data["base_model_relation"] == "adapter"
    assert sorted(data["tags"]) == sorted(
        ["text-to-image", "diffusers", "lora", "trl", "diffusion-opd", "z-image", "geneval", "ocr"]
    )
    assert 'DiffusionPipeline.from_pretrained("Tongyi-MAI/Z-Image"' in card.text
    assert f"guidance_scale={trainer.args.guidance_scale}" in card.text


def test_zimage_trains_with_cfg(tmp_path):
    """Two rounds at the base model's CFG: finite losses and only the student's weights move."""
    pipe = get_tiny_zimage_pipeline(seed=1)
    teacher = _teacher(pipe, tmp_path / "teacher", 1)
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": teacher},
        args=_args(tmp_path / "out", guidance_scale=CFG),
        train_dataset={"geneval": TRAIN_PROMPTS["geneval"]},
        peft_config=_student_config(),
    )
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    output = trainer.train()
    assert math.isfinite(output.training_loss) and output.training_loss > 0
    changed = {n for n, p in pipe.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".student." in n for n in changed)
