"""FLUX.1 students and teachers on the tiny FLUX pipeline: the family reproduces `FluxPipeline`'s sampler, the trainer
distils two teachers, the saved student reloads with `FluxPipeline.load_lora_weights`, the guidance embedding
reaches the model, and a schnell-style model (no guidance embedding, true CFG) trains."""

import dataclasses
import math

import pytest
import torch
from peft import LoraConfig

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.families.base import get_family
from trl_diffusion_opd.families.flux import FluxFamily
from trl_diffusion_opd.teachers import parse_teacher_spec
from trl_diffusion_opd.testing import get_tiny_flux_pipeline, save_toy_lora


TARGETS = FluxFamily.default_lora_targets
TRAIN_PROMPTS = {
    "geneval": ["a red circle", "a blue square", "two cats", "a green tree"],
    "ocr": ["the word cat", "a sign hi", "text abc", "a poster"],
}
EVAL_PROMPTS = {"geneval": ["a yellow star", "one dog"], "ocr": ["the word dog", "a label"]}
GUIDANCE = 3.5  # FLUX.1-dev's usual guidance-embedding value


def _args(output_dir, **kwargs) -> DiffusionOPDConfig:
    defaults = {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "ema": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "max_sequence_length": 32,  # the tiny T5 tokenizer's length
        "resolution": 32,
        "num_inference_steps": 4,
        "guidance_scale": GUIDANCE,
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


def _teacher(pipe, folder, seed: int):
    # Teachers fine-tuned from one base share most of their update; fully independent teachers would force the one
    # student into a compromise that caps the reachable KL reduction (about 50%).
    path = save_toy_lora(
        pipe, folder, seed=seed, std=0.1, rank=2, shared_seed=7, specific_scale=0.3, target_modules=TARGETS
    )
    return str(path)


def _student_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS)


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def _changed(module, before) -> set[str]:
    return {name for name, param in module.named_parameters() if not torch.equal(param, before[name])}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A FLUX.1-dev-style student distilled from two teachers: `(trainer, kl_before, kl_after, params_before)`."""
    tmp = tmp_path_factory.mktemp("flux")
    pipe = get_tiny_flux_pipeline(seed=0)
    teachers = {"geneval": _teacher(pipe, tmp / "geneval", 1), "ocr": _teacher(pipe, tmp / "ocr", 2)}
    trainer = DiffusionOPDTrainer(
        pipe,
        teachers,
        args=_args(tmp / "out", max_steps=80),
        train_dataset=TRAIN_PROMPTS,
        peft_config=_student_config(),
    )
    before = _snapshot(pipe.transformer)
    kl_before = trainer.compute_teacher_kl(EVAL_PROMPTS, use_ema=False)
    trainer.train()
    kl_after = trainer.compute_teacher_kl(EVAL_PROMPTS, use_ema=False)
    return trainer, kl_before, kl_after, before


def test_distillation_lowers_kl_to_each_flux_teacher(distilled):
    trainer, kl_before, kl_after, before = distilled
    assert kl_before.keys() == kl_after.keys() == {"geneval", "ocr"}
    for task in kl_before:
        assert kl_before[task] > 1e-7, f"teacher '{task}' equals the base: nothing to distil"
        reduction = 1 - kl_after[task] / kl_before[task]
        # A supervised objective, no chaotic outcome: with the student's seed 1 instead of 0 the reductions were 89.9%
        # (geneval) and 89.6% (ocr), so 80% leaves about 10 points for other seeds and machines.
        assert reduction >= 0.8, (
            f"KL to '{task}' fell by {reduction:.1%} only ({kl_before[task]:.3g} -> {kl_after[task]:.3g})"
        )
    # Only the student trained: base and teacher adapters are frozen.
    changed = _changed(trainer.pipeline.transformer, before)
    student = {n for n, _ in trainer.pipeline.transformer.named_parameters() if ".student." in n}
    assert changed and changed <= student
    assert {n for n in changed if ".lora_B." in n} == {n for n in student if ".lora_B." in n}


def test_rollout_reproduces_flux_pipeline_sampler(distilled):
    """The family's sigmas (dynamic shift), packing, ids, timestep convention and guidance embedding, through the
    trainer's rollout, give the latents `FluxPipeline.__call__` gives from the same initial noise."""
    trainer, *_ = distilled
    pipe = trainer.pipeline
    assert trainer.family.uses_guidance_embedding
    cond = trainer.prompt_cache(["a yellow star", "the word dog"])
    rollout = trainer.rollout(cond, torch.Generator().manual_seed(0))
    states = rollout["states"]
    assert states.shape == (5, 2, 4, 16, 16)  # (N + 1, B, 4 channels, 32 / 2, 32 / 2); packed in `velocity`
    with torch.no_grad():  # the pipeline runs the student adapter, which is the active one
        expected = pipe(
            prompt_embeds=cond["prompt_embeds"],
            pooled_prompt_embeds=cond["pooled_prompt_embeds"],
            latents=trainer.family.pack_latents(states[0]),
            num_inference_steps=4,
            guidance_scale=GUIDANCE,
            height=32,
            width=32,
            output_type="latent",
        ).images
    assert expected.shape == (2, 64, 16)  # (B, (32 / 2 / 2)^2 packed tokens, 4 channels x 2 x 2)
    torch.testing.assert_close(trainer.family.pack_latents(states[-1]), expected, atol=1e-5, rtol=1e-5)
    assert (states[-1] - states[0]).abs().max() > 0.1
    images = trainer.family.decode(states[-1], 32)
    assert len(images) == 2 and images[0].size == (32, 32)


def test_saved_flux_student_reloads_with_load_lora_weights(distilled, tmp_path):
    trainer, *_ = distilled
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()

    fresh = get_tiny_flux_pipeline(seed=0)
    family = get_family(fresh, max_sequence_length=32)
    generator = torch.Generator().manual_seed(1)
    cond = trainer.prompt_cache(["a yellow star", "the word dog", "one dog"])
    x = torch.randn((3, 4, 16, 16), generator=generator)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        base = family.velocity(fresh.transformer, x, sigma, cond, GUIDANCE)
        fresh.load_lora_weights(str(tmp_path / "adapter"))
        reloaded = family.velocity(fresh.transformer, x, sigma, cond, GUIDANCE)
        student = trainer.family.velocity(trainer.pipeline.transformer, x, sigma, cond, GUIDANCE)
    assert (student - base).abs().max() > 1e-3, "the student equals the base: the comparison would be vacuous"
    assert (reloaded - student).abs().max() <= 1e-5
    # Every adapted module of the student came back (double- and single-stream blocks, attention and MLPs).
    adapted = {n.split(".lora_A.")[0] for n, _ in fresh.transformer.named_parameters() if ".lora_A." in n}
    student_modules = {n.split(".lora_A.")[0] for n in trainer.student_state_dict() if ".lora_A." in n}
    assert adapted == student_modules
    assert any(m.startswith("single_transformer_blocks.") for m in adapted)
    assert any(m.endswith("ff.net.2") for m in adapted)


def test_teacher_guidance_reaches_the_guidance_embedding(distilled):
    trainer, *_ = distilled
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
    teacher = _teacher(pipe, tmp_path / "teacher", 1)
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": {"path": teacher, "guidance_scale": 2.0}},
        args=_args(tmp_path / "out", max_steps=2, learning_rate=1e-2, guidance_scale=1.5),
        train_dataset={"geneval": TRAIN_PROMPTS["geneval"]},
        peft_config=_student_config(),
    )
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

    before = _snapshot(pipe.transformer)
    output = trainer.train()
    assert math.isfinite(output.training_loss) and output.training_loss > 0
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    changed = _changed(pipe.transformer, before)
    student = {n for n, _ in pipe.transformer.named_parameters() if ".student." in n}
    assert changed and changed <= student
    assert any(".lora_B." in n for n in changed)
