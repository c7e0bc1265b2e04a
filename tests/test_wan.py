"""Wan's own rules on the tiny Wan pipelines: Wan 2.2's expert switch and both guidance scales follow
`WanPipeline.__call__` (with the flow-matching Euler scheduler) in the OPD, Flow-GRPO and DiffusionNFT trainers,
TI2V's frames decode like the pipeline's, a teacher with only a `transformer_2` LoRA supervises only the low-noise
steps, checkpoints hold both experts and resume exactly, and evaluation loads each expert's LoRA. The contract every
family keeps (sampler, KL, distillation over 3 seeds, reload into both experts, card) is
`tests/test_family_contract.py`."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from peft import LoraConfig
from safetensors.torch import load_file

from trl_diffusion_opd import (
    DiffusionNFTConfig,
    DiffusionNFTTrainer,
    DiffusionOPDConfig,
    DiffusionOPDTrainer,
    FlowGRPOConfig,
    FlowGRPOTrainer,
)
from trl_diffusion_opd.families.wan import WanFamily
from trl_diffusion_opd.teachers import STUDENT
from trl_diffusion_opd.testing import (
    TINY_WAN_FRAMES,
    TINY_WAN_RESOLUTION,
    TINY_WAN_TI2V_RESOLUTION,
    get_tiny_wan_pipeline,
    save_toy_lora,
)

from helpers import wan_latents


TARGETS = WanFamily.default_lora_targets
PROMPTS = {"geneval": ["a red circle", "two cats dancing"], "ocr": ["the word cat", "a sign hi"]}
STEPS = 4
LOW_2 = "pytorch_lora_weights_transformer_2.safetensors"


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
        "max_sequence_length": 16,
        "resolution": TINY_WAN_RESOLUTION,
        "num_frames": TINY_WAN_FRAMES,
        "num_inference_steps": STEPS,
        "guidance_scale": 1.0,
        "seed": 0,
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


def _student_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS)


def _teacher(pipe, folder, seed: int, experts=("transformer", "transformer_2")) -> str:
    """A toy teacher with a LoRA file per expert in `experts` (Wan 2.2's layout: one file per expert)."""
    for expert in experts:
        save_toy_lora(
            pipe,
            folder,
            seed=seed + 10 * (expert == "transformer_2"),
            std=0.1,
            rank=2,
            shared_seed=7,
            specific_scale=0.3,
            target_modules=TARGETS,
            expert=expert,
        )
    return str(folder)


def _reference(pipe, cond, negative, latents, guidance_scale, guidance_scale_2=None, resolution=TINY_WAN_RESOLUTION):
    """`WanPipeline.__call__` with the flow-matching Euler scheduler at the model's shift (the family's sampler)."""
    call = {"num_inference_steps": STEPS, "height": resolution, "width": resolution, "num_frames": TINY_WAN_FRAMES}
    return wan_latents(pipe, cond, negative, latents, guidance_scale, guidance_scale_2, **call)


def test_expert_switch_and_both_guidance_scales_follow_the_pipeline(tmp_path):
    """Wan 2.2's expert switch at boundary_ratio with guidance_scale / guidance_scale_2, through the trainer's rollout,
    gives `WanPipeline.__call__`'s latents from the same initial noise (the contract checks the rest of the sampler);
    the second scale is really used."""
    two_experts = True
    pipe = get_tiny_wan_pipeline(seed=0, two_experts=two_experts)
    guidance_2 = 2.0
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": _teacher(pipe, tmp_path / "t", 1)},
        args=_args(tmp_path / "out", guidance_scale=5.0, guidance_scale_2=guidance_2),
        train_dataset={"geneval": PROMPTS["geneval"]},
        peft_config=_student_config(),
    )
    family = trainer.family
    assert list(family.experts) == ["transformer", "transformer_2"]
    sigmas = family.sigmas(STEPS, TINY_WAN_RESOLUTION)
    # the expert each step runs: t = 1000·sigma >= 875 -> transformer (steps 0 only with shift 3 and 4 steps)
    assert family.expert_index(sigmas[:-1]).tolist() == [0, 1, 1, 1]

    cond = trainer.prompt_cache(PROMPTS["geneval"])
    rollout = trainer.rollout(cond, torch.Generator().manual_seed(0))
    states = rollout["states"]
    assert states.shape == (STEPS + 1, 2, 16, 2, 4, 4)  # (N + 1, B, C, (5 - 1) / 4 + 1 frames, 32 / 8, 32 / 8)
    negative = trainer.prompt_cache([""] * 2)
    with torch.no_grad():  # the pipeline runs the active (student) adapter
        expected = _reference(pipe, cond, negative, states[0], 5.0, guidance_2)
        # The same with guidance_scale_2 = guidance_scale differs on Wan 2.2: the second scale is really used.
        other = _reference(pipe, cond, negative, states[0], 5.0, None)
    torch.testing.assert_close(states[-1], expected, atol=1e-5, rtol=1e-5)
    assert (other - expected).abs().max() > 1e-3


def test_rollout_reproduces_ti2v_pipeline(tmp_path):
    """Wan 2.2 TI2V-5B's structure (text-to-video): per-token timesteps (`expand_timesteps`), 48 latent channels and
    the Wan 2.2 VAE's 16x spatial compression; the trainer's rollout decodes to `WanPipeline.__call__`'s frames (the
    contract compares the latents)."""
    pipe = get_tiny_wan_pipeline(seed=0, ti2v=True)
    assert pipe.config.expand_timesteps and pipe.vae_scale_factor_spatial == 16
    resolution = TINY_WAN_TI2V_RESOLUTION
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": _teacher(pipe, tmp_path / "t", 1, ("transformer",))},
        args=_args(tmp_path / "out", guidance_scale=5.0, resolution=resolution),
        train_dataset={"geneval": PROMPTS["geneval"]},
        peft_config=_student_config(),
    )
    assert trainer.family.resolution_multiple == 32  # the VAE's 16x times the 2x2 patch
    cond = trainer.prompt_cache(PROMPTS["geneval"])
    states = trainer.rollout(cond, torch.Generator().manual_seed(0))["states"]
    assert states.shape == (STEPS + 1, 2, 48, 2, 4, 4)  # (N + 1, B, C, (5 - 1) / 4 + 1, 64 / 16, 64 / 16)
    negative = trainer.prompt_cache([""] * 2)
    video = trainer.decode(states[-1])
    assert len(video) == 2 and len(video[0]) == TINY_WAN_FRAMES and video[0][0].size == (resolution, resolution)
    scheduler = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=scheduler.config.flow_shift)
    with torch.no_grad():  # the pipeline's own decoding (latents_mean / latents_std of 48 channels, unpatchify)
        frames = pipe(
            prompt_embeds=cond["prompt_embeds"],
            negative_prompt_embeds=negative["prompt_embeds"],
            latents=states[0],
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            height=resolution,
            width=resolution,
            num_frames=TINY_WAN_FRAMES,
            output_type="np",
        ).frames
    pipe.scheduler = scheduler
    ours = np.stack([np.stack([np.asarray(frame) for frame in sample]) for sample in video]) / 255.0
    assert ours.shape == frames.shape == (2, TINY_WAN_FRAMES, resolution, resolution, 3)
    assert np.abs(ours - frames).max() <= 1 / 255 + 1e-6  # 8-bit rounding of the PIL frames


def test_low_noise_teacher_supervises_only_the_low_noise_steps(tmp_path):
    """A teacher with only a `transformer_2` LoRA supervises only the low-noise steps, and the high-noise expert's
    student LoRA gets no gradient from it."""
    pipe = get_tiny_wan_pipeline(seed=0, two_experts=True)
    both = _teacher(pipe, tmp_path / "both", 1)
    low_only = _teacher(pipe, tmp_path / "low", 2, ("transformer_2",))
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": both, "ocr": low_only},
        args=_args(tmp_path / "out", max_steps=1, student_adapter=both, guidance_scale=3.0, guidance_scale_2=2.0),
        train_dataset=PROMPTS,
    )
    specs = trainer.teacher_specs
    assert specs["geneval"][0].experts == ("transformer", "transformer_2")
    assert specs["ocr"][0].experts == ("transformer_2",)
    # the teachers' weights as stored, keyed per expert like the student (started from the same files)
    teacher, student = trainer.adapter_state_dict("geneval"), trainer.student_state_dict()
    assert teacher.keys() == student.keys() and all(torch.equal(teacher[k], student[k]) for k in student)
    assert {key.split(".")[0] for key in trainer.adapter_state_dict("ocr")} == {"transformer_2"}

    # Low-noise teacher only: KL only at the steps transformer_2 runs (1..3), exactly 0 at step 0.
    _, kl_steps = trainer.task_loss(
        trainer.model, "ocr", [{"prompt": p} for p in PROMPTS["ocr"]], torch.Generator().manual_seed(0), False
    )
    assert kl_steps[0] == 0 and (kl_steps[1:] > 1e-6).all()

    trainer.model.zero_grad(set_to_none=True)
    trainer.task_loss(
        trainer.model, "ocr", [{"prompt": p} for p in PROMPTS["ocr"]], torch.Generator().manual_seed(0), True
    )
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if f".{STUDENT}." in n}
    high = [g for n, g in grads.items() if n.startswith("transformer.")]
    low = [g for n, g in grads.items() if n.startswith("transformer_2.")]
    assert high and all(g is None for g in high)
    assert any(g is not None and g.abs().max() > 0 for g in low)


def test_two_expert_checkpoint_ema_resume_and_card(tmp_path):
    """Checkpoints hold both experts' LoRAs (EMA weights) and the raw training weights of both; resuming restores
    them exactly; the card says how to load both experts."""
    pipe = get_tiny_wan_pipeline(seed=0, two_experts=True)
    teachers = {"geneval": _teacher(pipe, tmp_path / "g", 1)}
    args = _args(tmp_path / "out", max_steps=2, save_strategy="steps", save_steps=2, ema=True, ema_update_interval=1)
    trainer = DiffusionOPDTrainer(
        pipe, teachers, args=args, train_dataset={"geneval": PROMPTS["geneval"]}, peft_config=_student_config()
    )
    trainer.train()
    folder = tmp_path / "out" / "checkpoint-2"
    assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / LOW_2).is_file()
    state = trainer.student_state_dict()
    assert {k.split(".")[0] for k in state} == {"transformer", "transformer_2"}
    saved = load_file(str(folder / "student_training_weights.safetensors"))
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    # The exported files hold the EMA weights of each expert (decay 0.9, so not the raw weights).
    with trainer._ema_weights():
        ema = trainer.student_state_dict()
    low = load_file(str(folder / LOW_2))
    key = next(k for k in ema if k.startswith("transformer_2.") and ".lora_B." in k)
    torch.testing.assert_close(low["transformer." + key.removeprefix("transformer_2.")], ema[key])
    assert not torch.equal(ema[key], state[key])

    card = (folder / "README.md").read_text()
    assert f'weight_name="{LOW_2}", load_into_transformer_2=True' in card
    assert "pipeline_tag: text-to-video" in card and ".frames[0]" in card

    fresh = DiffusionOPDTrainer(
        get_tiny_wan_pipeline(seed=0, two_experts=True),
        teachers,
        args=_args(tmp_path / "out2", ema=True),
        train_dataset={"geneval": PROMPTS["geneval"]},
        peft_config=_student_config(),
    )
    fresh._load_from_checkpoint(str(folder))
    resumed = fresh.student_state_dict()
    assert all(torch.equal(resumed[k], state[k]) for k in state)


def _rl_args(config_class, output_dir, **kwargs):
    defaults = {
        "output_dir": str(output_dir),
        "max_steps": 1,
        "num_generations": 2,
        "per_device_train_batch_size": 2,
        "save_strategy": "no",
        "ema": False,
        "report_to": "none",
        "disable_tqdm": True,
        "max_sequence_length": 16,
        "resolution": TINY_WAN_RESOLUTION,
        "num_frames": TINY_WAN_FRAMES,
        "num_inference_steps": STEPS,
        "guidance_scale": 5.0,
        "guidance_scale_2": 2.0,
        "step_batch_size": None,
        "beta": 0.0,
        "seed": 0,
    }
    return config_class(**{**defaults, **kwargs})


def test_grpo_and_nft_honour_guidance_scale_2(tmp_path):
    """Flow-GRPO's training pass recomputes the rollout's log-probs exactly (ratio 1 before an update) on Wan 2.2 with
    guidance_scale 5 / guidance_scale_2 2, and DiffusionNFT's sampler gives `WanPipeline.__call__`'s latents with
    both scales: neither ignores the low-noise expert's CFG scale (steps 1-3 of 4 run `transformer_2`)."""
    pipe = get_tiny_wan_pipeline(seed=0, two_experts=True)
    grpo = FlowGRPOTrainer(
        pipe,
        "brightness",
        args=_rl_args(FlowGRPOConfig, tmp_path / "grpo"),
        train_dataset=PROMPTS["geneval"],
        peft_config=_student_config(),
    )
    batch = grpo.make_batch([{"prompt": p} for p in PROMPTS["geneval"]], grpo._generator("t"))
    for j in range(grpo.args.num_train_timesteps):
        terms = grpo.step_terms(grpo.model, batch, range(j, j + 1))
        torch.testing.assert_close(terms["log_ratio"], torch.zeros_like(terms["log_ratio"]), rtol=0, atol=1e-4)

    nft = DiffusionNFTTrainer(
        get_tiny_wan_pipeline(seed=0, two_experts=True),
        "brightness",
        args=_rl_args(DiffusionNFTConfig, tmp_path / "nft", sampler="euler"),
        train_dataset=PROMPTS["geneval"],
        peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS),  # B = 0: the old policy is the base
    )
    out = nft.generate_batch([{"prompt": p} for p in PROMPTS["geneval"]], torch.Generator().manual_seed(3))
    initial = nft.family.init_latents(2, TINY_WAN_RESOLUTION, torch.Generator().manual_seed(3))
    negative = nft.prompt_cache([""] * 2)
    with torch.no_grad():
        expected = _reference(nft.pipeline, out["cond"], negative, initial, 5.0, 2.0)
        ignored = _reference(nft.pipeline, out["cond"], negative, initial, 5.0, None)
    torch.testing.assert_close(out["x0"], expected, atol=1e-5, rtol=1e-5)
    assert (ignored - expected).abs().max() > 1e-3


def _frames(videos) -> np.ndarray:
    """Videos (lists of PIL frames) as one uint8 array `(videos, frames, H, W, 3)`."""
    return np.stack([np.stack([np.asarray(frame.convert("RGB")) for frame in video]) for video in videos])


def _pipeline_videos(pipe, prompts, seed: int = 0) -> np.ndarray:
    """`WanPipeline.__call__` (its own UniPC sampler) with the settings of `test_eval_loads_each_expert_lora`."""
    output = pipe(
        prompt=prompts,
        num_inference_steps=3,
        guidance_scale=1.0,
        height=TINY_WAN_RESOLUTION,
        width=TINY_WAN_RESOLUTION,
        num_frames=TINY_WAN_FRAMES,
        max_sequence_length=16,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))],
        output_type="pil",
    )
    return _frames(output.frames)


def test_eval_loads_each_expert_lora(tmp_path):
    """`evaluate_models` on Wan 2.2 loads a saved two-expert student into both experts: its videos are exactly those of
    `WanPipeline` with the LoRAs loaded by diffusers (`load_lora_weights(..., load_into_transformer_2=True)`), and
    differ from the same folder without its `transformer_2` file. A folder with only the `transformer_2` file adapts
    only the low-noise expert (the high-noise one runs the base: exactly diffusers with that file alone), likewise a
    folder with only the `transformer` file, whatever rows ran before."""
    import shutil

    from trl_diffusion_opd.evaluation import evaluate_models

    pipe = get_tiny_wan_pipeline(seed=0, two_experts=True)
    # LoRAs strong enough (std 1) to change the tiny model's 8-bit frames clearly.
    for expert in ("transformer", "transformer_2"):
        save_toy_lora(
            pipe,
            tmp_path / "t",
            seed=1 + (expert == "transformer_2"),
            std=1.0,
            rank=2,
            target_modules=TARGETS,
            expert=expert,
        )
    teacher = str(tmp_path / "t")
    # The student as the trainer saves it (one file per expert): here a copy of that teacher.
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": teacher},
        args=_args(tmp_path / "out", student_adapter=teacher),
        train_dataset={"geneval": PROMPTS["geneval"]},
    )
    trainer.save_model(str(tmp_path / "student"))
    high, low = tmp_path / "high", tmp_path / "low"
    high.mkdir(), low.mkdir()
    shutil.copy(tmp_path / "student" / "pytorch_lora_weights.safetensors", high)
    shutil.copy(tmp_path / "student" / LOW_2, low)

    prompts = PROMPTS["geneval"]
    pipe = get_tiny_wan_pipeline(seed=0, two_experts=True)
    result = evaluate_models(
        pipe,
        prompts={"brightness": prompts},
        adapters={"low only": str(low), "student": str(tmp_path / "student"), "high only": str(high)},
        num_inference_steps=3,
        guidance_scale=1.0,
        resolution=TINY_WAN_RESOLUTION,
        num_frames=TINY_WAN_FRAMES,
        max_sequence_length=16,
        batch_size=2,
        progress=False,
    )
    videos = {label: _frames(rows[0]) for label, rows in result.samples.items()}
    assert [m.experts for m in result.models[1:]] == [
        ("transformer_2",),
        ("transformer", "transformer_2"),
        ("transformer",),
    ]
    assert not any(".low_only." in n for n, _ in pipe.transformer.named_parameters())
    assert any(".low_only." in n for n, _ in pipe.transformer_2.named_parameters())

    reference = get_tiny_wan_pipeline(seed=0, two_experts=True)
    base = _pipeline_videos(reference, prompts)
    reference.load_lora_weights(str(tmp_path / "student"), adapter_name="s")
    reference.load_lora_weights(
        str(tmp_path / "student"), weight_name=LOW_2, adapter_name="s", load_into_transformer_2=True
    )
    student = _pipeline_videos(reference, prompts)
    low_reference = get_tiny_wan_pipeline(seed=0, two_experts=True)
    low_reference.load_lora_weights(str(low), weight_name=LOW_2, adapter_name="l", load_into_transformer_2=True)
    low_only = _pipeline_videos(low_reference, prompts)
    high_reference = get_tiny_wan_pipeline(seed=0, two_experts=True)
    high_reference.load_lora_weights(str(high), adapter_name="h")
    high_only = _pipeline_videos(high_reference, prompts)

    np.testing.assert_array_equal(videos["base"], base)
    np.testing.assert_array_equal(videos["student"], student)
    np.testing.assert_array_equal(videos["low only"], low_only)
    np.testing.assert_array_equal(videos["high only"], high_only)  # transformer_2 ran the base, not the student
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).max()  # noqa: E731
    # Measured: the transformer_2 LoRA moves the student's frames by up to 9 levels of 255, each expert's LoRA alone
    # moves the base's by 7 (transformer_2) and 12 (transformer).
    assert diff(videos["student"], videos["high only"]) > 2
    assert diff(videos["low only"], base) > 2 and diff(videos["high only"], base) > 2


def test_eval_refuses_a_transformer_2_lora_on_one_expert_pipelines(tmp_path):
    """A Wan 2.2 adapter's `transformer_2` file on a Wan 2.1 pipeline (no low-noise expert) is an error, raised before
    anything loads, not a LoRA silently dropped."""
    from trl_diffusion_opd.evaluation import load_adapter

    two = get_tiny_wan_pipeline(seed=0, two_experts=True)
    for expert in ("transformer", "transformer_2"):
        save_toy_lora(two, tmp_path / "both", seed=1, rank=2, target_modules=TARGETS, expert=expert)
    one = get_tiny_wan_pipeline(seed=0)
    with pytest.raises(
        ValueError, match=r"LoRA for 'transformer_2' \(pytorch_lora_weights_transformer_2.safetensors\)"
    ):
        load_adapter(one, "student", str(tmp_path / "both"))
    assert not hasattr(one.transformer, "peft_config")  # checked before anything loads
