"""FlowGRPOTrainer (Flow-GRPO / GRPO-Guard) on the tiny SD3 pipeline with rule-based rewards."""

import logging
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer, FlowGRPOConfig, FlowGRPOTrainer
from trl_diffusion_opd.rewards import get_reward
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline


ATTENTION = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
PROMPTS = [f"prompt {i}" for i in range(4)]
HELD_OUT = [f"held out {i}" for i in range(16)]


def _config(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "resolution": 32,
        "num_inference_steps": 4,
        "num_generations": 4,
        "per_device_train_batch_size": 2,
        "max_sequence_length": 1,
        "learning_rate": 3e-2,
        "lr_scheduler_type": "constant",
        "save_strategy": "no",
        "ema": False,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "guidance_scale": 1.0,
        "beta": 0.0,
        "step_batch_size": None,
        "scale_rewards": "group",  # the margins below were measured with the per-group std
        "logging_steps": 1,
    }
    defaults.update(kwargs)
    return FlowGRPOConfig(**defaults)


def _trainer(tmp_path, rewards="brightness", **kwargs):
    return FlowGRPOTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        rewards,
        args=_config(tmp_path, **kwargs),
        train_dataset=PROMPTS,
        peft_config=LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=ATTENTION),
    )


def _mean_reward(trainer, name):
    reward = get_reward(name)
    return torch.tensor(reward(trainer.generate(HELD_OUT, seed=1)))


# One seed's training outcome depends on the CPU's floating-point details: at the former lr 3e-2 (one seed, 60 steps)
# Adam's full-size steps on noisy group advantages made the training reward collapse and recover now and then, and
# another machine of the same kind turned this machine's +0.005 into -0.009. At lr 1e-2 the reward climbs steadily,
# and every outcome test trains these seeds and asserts on all of them with margins measured over seeds 0-4.
SEEDS = (0, 1, 2)


def _brightness_gains(tmp_path, **kwargs):
    """Held-out brightness after minus before training, `(len(SEEDS), 16)`: one row per seed, same noise per image."""
    gains = []
    for seed in SEEDS:
        trainer = _trainer(tmp_path / f"seed{seed}", seed=seed, **kwargs)
        before = _mean_reward(trainer, "brightness")
        trainer.train()
        gains.append(_mean_reward(trainer, "brightness") - before)
    return torch.stack(gains)


def test_grpo_guard_raises_brightness_of_fresh_samples(tmp_path):
    gains = _brightness_gains(
        tmp_path, max_steps=40, learning_rate=1e-2, ratio_normalization="grpo_guard", clip_range=2e-6
    )
    # The tiny VAE maps latents to a narrow brightness band (a +3 latent shift moves it by ~0.02), so the margins are
    # measured against that band. Mean gain of seeds 0-4: +0.0094, +0.0061, +0.0076, +0.0062, +0.0087 (min 0.0061,
    # mean 0.0076), every held-out image brighter in each.
    assert gains.mean() > 0.004, gains.mean(1)
    assert (gains.mean(1) > 0.002).all(), gains.mean(1)
    assert (gains > 0).float().mean() >= 0.9  # held-out images (same noise) that came out brighter


def test_flow_grpo_raises_brightness_of_fresh_samples(tmp_path):
    gains = _brightness_gains(tmp_path, max_steps=60, learning_rate=1e-2)
    # Without GRPO-Guard's per-step reweighting the climb is slower (after 40 steps seed 2 had gained only +0.0014).
    # Mean gain of seeds 0-4 after 60 steps: +0.0072, +0.0087, +0.0067, +0.0045, +0.0083 (min 0.0045, mean 0.0071),
    # every held-out image brighter in each.
    assert gains.mean() > 0.004, gains.mean(1)
    assert (gains.mean(1) > 0.002).all(), gains.mean(1)
    assert (gains > 0).float().mean() >= 0.9


@pytest.mark.parametrize("normalization", ["none", "grpo_guard"])
def test_ratio_is_one_and_kl_zero_before_the_first_update(tmp_path, normalization):
    trainer = _trainer(tmp_path, beta=0.04, ratio_normalization=normalization, step_batch_size=1, guidance_scale=2.0)
    batch = trainer.make_batch([{"prompt": p} for p in PROMPTS[:2]], trainer._generator("t"))
    assert batch["log_probs"].shape == (4, 8)
    for j in range(trainer.args.num_train_timesteps):
        terms = trainer.step_terms(trainer.model, batch, range(j, j + 1))
        # The log-prob stored at rollout is the one recomputed for training (same rows, same calls).
        torch.testing.assert_close(terms["log_prob"], terms["old_log_prob"], rtol=0, atol=1e-6)
        torch.testing.assert_close(terms["log_ratio"].exp(), torch.ones(8), rtol=0, atol=1e-6)
        # A fresh student (LoRA B = 0) is the base: the KL to it is exactly 0.
        assert torch.equal(terms["kl"], torch.zeros(8))


def test_second_iteration_on_a_batch_is_off_policy_and_clipped(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, num_iterations=2, clip_range=1e-6)
    trainer.train()
    first, second = [h for h in trainer.state.log_history if "ratio/mean" in h]
    assert first["ratio/max"] == pytest.approx(1.0, abs=1e-6) and first["clip_fraction"] == 0.0
    assert abs(second["ratio/max"] - 1.0) > 1e-6 or abs(second["ratio/min"] - 1.0) > 1e-6
    assert second["clip_fraction"] > 0.0
    # The second step reuses the first one's batch: nothing was generated or scored.
    assert "generation_time" in first and "reward" in first
    assert "generation_time" not in second and "reward" not in second


def test_only_the_student_changes(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, beta=0.04)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(start[n], p)}
    assert changed and all(".student." in n for n in changed)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.student_parameters}


def test_reward_weights_choose_which_reward_is_climbed(tmp_path):
    """An exact property instead of a training outcome: one update with weights (1, 0) on (brightness, darkness) is
    the update of brightness alone, bit for bit, and one with (0, 1) is its mirror image (darkness = 1 - brightness
    negates every group-normalised advantage, and the first Adam step follows the gradient's sign). That brightness
    training raises brightness is measured over seeds in `test_flow_grpo_raises_brightness_of_fresh_samples`."""

    def darkness(images, prompts, metadata):
        return [1.0 - b for b in get_reward("brightness")(images)]

    updates = {}
    for weights in (None, [1.0, 0.0], [0.0, 1.0]):
        rewards = "brightness" if weights is None else ["brightness", darkness]
        trainer = _trainer(tmp_path / str(weights), rewards=rewards, max_steps=1, reward_weights=weights)
        start = [p.detach().clone() for p in trainer.student_parameters]
        trainer.train()
        updates[None if weights is None else tuple(weights)] = torch.cat(
            [(p.detach() - s).flatten() for p, s in zip(trainer.student_parameters, start)]
        )
        if weights is not None:
            logged = trainer.state.log_history[0]
            assert logged["rewards/brightness"] + logged["rewards/darkness"] == pytest.approx(1.0, abs=1e-6)
            assert logged["reward"] == pytest.approx(
                logged["rewards/brightness" if weights[0] else "rewards/darkness"]
            )
    brightness, darkness_update = updates[(1.0, 0.0)], updates[(0.0, 1.0)]
    assert brightness.abs().max() > 0.5 * trainer.args.learning_rate  # Adam's first step: about lr per weight
    assert torch.equal(brightness, updates[None])
    # Weights whose gradient is at Adam's eps (~1e-8) move by less than lr, and there rounding shows: measured at most
    # 1.1e-3 lr apart (one weight of 7680), so 2e-2 lr still says "mirror image" for steps of about lr.
    torch.testing.assert_close(darkness_update, -brightness, rtol=1e-3, atol=2e-2 * trainer.args.learning_rate)


def test_saved_adapter_is_a_diffusion_opd_teacher_and_card_names_algorithm(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, ratio_normalization="grpo_guard", clip_range=2e-6)
    trainer.train()
    trainer.save_model()
    out = Path(trainer.args.output_dir)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "**Flow-GRPO**" in card and "**GRPO-Guard**" in card
    assert "| brightness | 1.0 |" in card and "| ratio normalisation | GRPO-Guard" in card
    assert "flow-grpo" in card and "grpo-guard" in card and "2510.22319" in card and "2505.05470" in card

    # The RL adapter feeds DiffusionOPD as a teacher without conversion.
    opd = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {"bright": str(out)},
        args=DiffusionOPDConfig(
            output_dir=str(tmp_path / "opd"),
            max_steps=1,
            resolution=32,
            num_inference_steps=4,
            per_device_train_batch_size=2,
            max_sequence_length=1,
            save_strategy="no",
            ema=False,
            report_to="none",
            disable_tqdm=True,
            guidance_scale=1.0,
        ),
        train_dataset={"bright": PROMPTS},
    )
    teacher = opd.adapter_state_dict("bright")
    student = trainer.student_state_dict()
    assert teacher.keys() == student.keys()
    assert all(torch.equal(teacher[k], student[k]) for k in student)
    assert opd.compute_teacher_kl({"bright": PROMPTS[:2]})["bright"] > 0


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="noise_level"):
        _config(tmp_path, noise_level=0.0)
    with pytest.raises(ValueError, match="ratio_normalization"):
        _config(tmp_path, ratio_normalization="nope")
    with pytest.raises(ValueError, match="num_generations"):
        _config(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="reward_weights"):
        _trainer(tmp_path, rewards=["brightness", "saturation"], reward_weights=[1.0])


@pytest.mark.parametrize("command, config", [("grpo", "tiny_grpo.yaml"), ("nft", "tiny_nft.yaml")])
def test_cli_stage_one_commands_write_an_adapter_and_card(tmp_path, command, config):
    from trl_diffusion_opd import cli

    config_path = Path(__file__).parent.parent / "examples" / "configs" / config
    out = tmp_path / command
    argv = ["--config", str(config_path), "--max_steps", "2", "--output_dir", str(out), "--disable_tqdm", "true"]
    assert cli.main([command, *argv]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert ("**Flow-GRPO**" if command == "grpo" else "**DiffusionNFT**") in card
    assert "| brightness | 1.0 |" in card
    assert cli.main([command, "--config", str(config_path), "--reward_funcs", "nope", "--output_dir", str(out)]) == 2


# ---------------------------------------------------------------------------------------------- CPS, groups, resume


@pytest.mark.parametrize(
    "settings",
    [{"cps_log_prob": "flow_grpo"}, {"cps_log_prob": "gaussian"}, {"ratio_normalization": "grpo_guard"}],
    ids=["flow_grpo", "gaussian", "grpo_guard"],
)
def test_cps_trains_through_its_deterministic_last_step(tmp_path, settings):
    # timestep_fraction=1.0 trains the step into t = 0, whose std is 0 (it used to give a nan loss)
    trainer = _trainer(
        tmp_path, sde_type="cps", num_inference_steps=2, timestep_fraction=1.0, num_iterations=2, beta=0.04, **settings
    )
    batch = trainer.make_batch([{"prompt": p} for p in PROMPTS[:2]], trainer._generator("t"))
    assert torch.equal(batch["log_probs"][-1], torch.zeros(8))  # x' = mu on the last step: 0 in both conventions
    start = [p.detach().clone() for p in trainer.student_parameters]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "ratio/mean" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and math.isfinite(h["ratio/min"]) for h in logs)
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.student_parameters))
    # off-policy (second iteration) the last step's log-ratio stays finite
    terms = trainer.step_terms(trainer.model, trainer._buffer, range(1, 2))
    assert torch.isfinite(terms["log_ratio"]).all()
    if settings.get("cps_log_prob") == "gaussian" or "ratio_normalization" in settings:
        assert torch.equal(terms["log_ratio"], torch.zeros(8))  # no density: no ratio, no policy gradient
    else:  # Flow-GRPO's -mean((x' - mu_theta)^2) - 0
        assert (terms["log_ratio"] < 0).all()


def test_cps_conventions_scale_the_log_ratio_by_two_sigma_squared(tmp_path):
    from trl_diffusion_opd.transition import gaussian_log_prob

    trainer = _trainer(tmp_path, sde_type="cps", num_inference_steps=4, max_steps=1)
    batch = trainer.make_batch([{"prompt": p} for p in PROMPTS[:2]], trainer._generator("t"))
    trainer.train()  # move the policy: the recomputed log-probs now differ from the stored ones
    exact_batch = dict(batch)  # the same rollout with its log-probs in the exact convention
    exact_batch["log_probs"] = torch.stack(
        [
            gaussian_log_prob(batch["states"][j + 1], batch["means"][j], trainer_std(trainer, batch, j), "mean")
            for j in range(4)
        ]
    )
    for j in range(3):  # the stochastic steps
        flow = trainer.step_terms(trainer.model, batch, range(j, j + 1))["log_ratio"]
        trainer.args.cps_log_prob = "gaussian"
        exact = trainer.step_terms(trainer.model, exact_batch, range(j, j + 1))["log_ratio"]
        trainer.args.cps_log_prob = "flow_grpo"
        std = trainer_std(trainer, batch, j)
        assert flow.abs().max() > 0
        torch.testing.assert_close(exact, flow / (2 * std**2), rtol=1e-3, atol=1e-6)


def trainer_std(trainer, batch, j):
    return batch["sigmas"][j + 1].item() * math.sin(trainer.args.noise_level * math.pi / 2)


def test_config_rejects_untrainable_cps_and_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="num_inference_steps"):
        _config(tmp_path, sde_type="cps", num_inference_steps=1)
    _config(tmp_path, sde_type="cps", num_inference_steps=2, timestep_fraction=1.0)  # trainable: one stochastic step
    with pytest.raises(ValueError, match="cps_log_prob"):
        _config(tmp_path, cps_log_prob="exact")
    with pytest.raises(ValueError, match="grpo_guard_bias"):
        _config(tmp_path, grpo_guard_bias="mean")


def _constant_for_prompt_0(images, prompts, metadata):
    brightness = get_reward("brightness")(images, prompts, metadata)
    return [0.5 if prompt == "prompt 0" else value for prompt, value in zip(prompts, brightness)]


@pytest.mark.parametrize("drop", [True, False])
def test_zero_std_groups_are_dropped_as_in_flow_grpo(tmp_path, drop):
    trainer = _trainer(tmp_path, rewards=_constant_for_prompt_0, drop_zero_std_groups=drop)
    rows = [{"prompt": p} for p in PROMPTS[:2]]
    batch = trainer.make_batch(rows, trainer._generator("t"))
    assert trainer._metrics["zero_std_fraction"] == [0.5]
    full = FlowGRPOTrainer.__mro__[1].make_batch(trainer, rows, trainer._generator("t"))  # same seed, no filter
    assert torch.equal(full["advantages"][:4], torch.zeros(4))  # exactly 0 for the constant group
    if not drop:
        assert torch.equal(batch["states"], full["states"]) and len(batch["rows"]) == 8
        return
    assert [r["prompt"] for r in batch["rows"]] == ["prompt 1"] * 4
    for key in ("states", "log_probs", "means"):
        assert torch.equal(batch[key], full[key][:, 4:]), key
    for key in ("x0", "rewards", "advantages"):
        assert torch.equal(batch[key], full[key][4:]), key
    assert torch.equal(batch["cond"]["prompt_embeds"], full["cond"]["prompt_embeds"][4:])
    assert math.isfinite(trainer.compute_rl_loss(trainer.model, batch))
    # only constant groups: the batch is kept whole
    trainer2 = _trainer(tmp_path / "all", rewards=lambda images, p, m: [1.0] * len(images))
    assert len(trainer2.make_batch(rows, trainer2._generator("t"))["rows"]) == 8


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_in_the_middle_of_num_iterations_is_bit_exact(tmp_path, caplog):
    settings = {"max_steps": 4, "num_iterations": 2, "save_strategy": "steps", "save_steps": 1, "ema": True}
    straight = _trainer(tmp_path / "straight", **settings)
    straight.train()
    interrupted = _trainer(tmp_path / "resumed", **settings)
    interrupted.add_callback(_StopAt(3))
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-3"
    assert (checkpoint / "rl_batch-0.safetensors").is_file()  # mid-cycle: the batch is stored
    assert not (tmp_path / "resumed" / "out" / "checkpoint-2" / "rl_batch-0.safetensors").exists()  # cycle boundary
    assert (checkpoint / "ema_state.safetensors").is_file() and not (checkpoint / "ema_state.pt").exists()

    resumed = _trainer(tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for a, b in zip(straight.student_parameters, resumed.student_parameters):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)

    # without the stored batch the resume regenerates it, says so, and ends elsewhere
    (checkpoint / "rl_batch-0.safetensors").unlink()
    regenerated = _trainer(tmp_path / "resumed", **settings)
    with caplog.at_level(logging.WARNING):
        regenerated.train(resume_from_checkpoint=str(checkpoint))
    assert "will not match an uninterrupted one" in caplog.text
    assert any(not torch.equal(a, b) for a, b in zip(straight.student_parameters, regenerated.student_parameters))
