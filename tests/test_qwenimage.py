"""Qwen-Image students and teachers on the tiny `QwenImagePipeline`: the family reproduces the pipeline's sampler
(true CFG with its norm rescale, dynamic shift, timestep convention, packing), padding the prompt embeddings does not
change the velocity, the KL is 0 between identical adapters, the trainer distils two teachers (diffusers and PEFT
formats), the saved student reloads with `QwenImagePipeline.load_lora_weights` and the model card names the base."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.families.base import cond_cat, get_family
from trl_diffusion_opd.families.qwenimage import QwenImageFamily
from trl_diffusion_opd.testing import TINY_PIPELINES, get_tiny_qwenimage_pipeline, save_toy_lora


TARGETS = QwenImageFamily.default_lora_targets
TRAIN_PROMPTS = {
    "geneval": ["a red circle", "a blue square", "two cats", "a green tree"],
    "ocr": ["the word cat", "a sign hi", "text abc", "a poster"],
}
EVAL_PROMPTS = {"geneval": ["a yellow star", "one dog"], "ocr": ["the word dog", "a label"]}
TRUE_CFG = 4.0  # Qwen-Image's default `true_cfg_scale`
NEGATIVE = " "  # the negative prompt of Qwen-Image's README
MAX_LENGTH = 32


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
        "max_sequence_length": MAX_LENGTH,
        "resolution": 32,
        "num_inference_steps": 4,
        "guidance_scale": TRUE_CFG,
        "negative_prompt": NEGATIVE,
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


def _teacher(pipe, folder, seed: int, format: str = "diffusers") -> str:
    # Teachers fine-tuned from one base share most of their update (see tests/test_flux.py); with a larger specific
    # part (0.3) the tiny Qwen-Image student needs over 100 rounds to cut the KL by 80%.
    path = save_toy_lora(
        pipe,
        folder,
        seed=seed,
        std=0.1,
        rank=2,
        shared_seed=7,
        specific_scale=0.1,
        target_modules=TARGETS,
        format=format,
    )
    return str(path)


def _student_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A student distilled from a diffusers-format and a PEFT-format teacher: `(trainer, kl_before, kl_after)`."""
    # One thread, as conftest sets for each test: its autouse fixture is function-scoped and runs after this one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("qwenimage")
        pipe = get_tiny_qwenimage_pipeline(seed=0)
        pipe.register_to_config(_name_or_path="Qwen/Qwen-Image")
        teachers = {
            "geneval": _teacher(pipe, tmp / "geneval", 1),
            "ocr": _teacher(pipe, tmp / "ocr", 2, format="peft"),
        }
        trainer = DiffusionOPDTrainer(
            pipe,
            teachers,
            # 70 rounds at lr 5e-3 cut the held-out KL by 89.9-95.1% over 3 seeds (pipeline, teachers, trainer).
            args=_args(tmp / "out", max_steps=70, learning_rate=5e-3),
            train_dataset=TRAIN_PROMPTS,
            peft_config=_student_config(),
        )
        kl_before = trainer.compute_teacher_kl(EVAL_PROMPTS, use_ema=False)
        trainer.train()
        kl_after = trainer.compute_teacher_kl(EVAL_PROMPTS, use_ema=False)
        yield trainer, kl_before, kl_after
    finally:
        torch.set_num_threads(threads)


def test_distillation_lowers_kl_to_each_qwenimage_teacher(distilled):
    trainer, kl_before, kl_after = distilled
    assert kl_before.keys() == kl_after.keys() == {"geneval", "ocr"}
    for task in kl_before:
        assert kl_before[task] > 1e-7, f"teacher '{task}' equals the base: nothing to distil"
        reduction = 1 - kl_after[task] / kl_before[task]
        assert reduction >= 0.8, (
            f"KL to '{task}' fell by {reduction:.1%} only ({kl_before[task]:.3g} -> {kl_after[task]:.3g})"
        )


def test_rollout_reproduces_qwenimage_pipeline_sampler(distilled):
    """Through the trainer's rollout, the family's sigmas (exponential dynamic shift, terminal stretch), packing,
    timestep convention, prompt encoding and true CFG with the norm rescale give the latents
    `QwenImagePipeline.__call__` gives from the same initial noise, prompts and negative prompt."""
    trainer, *_ = distilled
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


def test_padding_does_not_change_the_velocity(distilled):
    """Cached rows are zero-padded to `max_sequence_length`; the mask keeps the padding out of the attention, so a
    row's velocity is the same alone, batched with a longer prompt, or given to the transformer unpadded."""
    trainer, *_ = distilled
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


def test_kl_is_zero_between_identical_adapters(distilled, tmp_path):
    """A student started from the teacher's own weights (PEFT format) has zero KL to it at every step."""
    trainer, kl_before, _ = distilled
    teacher = trainer.teacher_specs["ocr"][0].path
    pipe = get_tiny_qwenimage_pipeline(seed=0)
    twin = DiffusionOPDTrainer(
        pipe,
        {"ocr": teacher},
        args=_args(tmp_path / "out", student_adapter=teacher, noise_level=0.7),
        train_dataset={"ocr": TRAIN_PROMPTS["ocr"]},
    )
    rows = [{"prompt": p} for p in EVAL_PROMPTS["ocr"]]
    _, kl_per_step = twin.task_loss(twin.model, "ocr", rows, torch.Generator().manual_seed(0), backward=False)
    assert kl_per_step.shape == (3,) and kl_per_step.abs().max().item() < 1e-10
    assert kl_before["ocr"] > 1e-6  # while the base is far from that teacher


def test_saved_qwenimage_student_reloads_with_load_lora_weights(distilled, tmp_path):
    trainer, *_ = distilled
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()

    fresh = get_tiny_qwenimage_pipeline(seed=0)
    family = get_family(fresh, max_sequence_length=MAX_LENGTH)
    cond = trainer.prompt_cache(["a yellow star", "the word dog", "one dog"])
    negative = trainer._negative(3)
    x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        base = family.velocity(fresh.transformer, x, sigma, cond, TRUE_CFG, negative)
        fresh.load_lora_weights(str(tmp_path / "adapter"))
        reloaded = family.velocity(fresh.transformer, x, sigma, cond, TRUE_CFG, negative)
        student = trainer.family.velocity(trainer.pipeline.transformer, x, sigma, cond, TRUE_CFG, negative)
    assert (student - base).abs().max() > 1e-3, "the student equals the base: the comparison would be vacuous"
    assert (reloaded - student).abs().max() <= 1e-5
    adapted = {n.split(".lora_A.")[0] for n, _ in fresh.transformer.named_parameters() if ".lora_A." in n}
    student_modules = {n.split(".lora_A.")[0] for n in trainer.student_state_dict() if ".lora_A." in n}
    assert adapted == student_modules
    assert {m.split(".", 2)[2] for m in adapted} == set(TARGETS)  # both streams' attention and MLPs, every block


def test_model_card_names_qwen_image_base_and_tags(distilled, tmp_path):
    trainer, *_ = distilled
    trainer.create_model_card(model_name="qwen-opd")
    card = ModelCard.load(trainer.args.output_dir + "/README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "Qwen/Qwen-Image" and data["base_model_relation"] == "adapter"
    assert data["license"] == "apache-2.0"
    assert sorted(data["tags"]) == sorted(
        ["text-to-image", "diffusers", "lora", "trl", "diffusion-opd", "qwen-image", "geneval", "ocr"]
    )
    assert 'DiffusionPipeline.from_pretrained("Qwen/Qwen-Image"' in card.text
    # The quick start samples with the trained guidance: Qwen-Image's `guidance_scale` would be ignored.
    code = card.text.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "quick_start", "exec")
    assert f"true_cfg_scale={TRUE_CFG},\n    negative_prompt={NEGATIVE!r},\n" in code and "guidance_scale" not in code
    assert f"max_sequence_length={MAX_LENGTH}," in code


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
