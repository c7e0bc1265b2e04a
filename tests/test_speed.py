"""Issue 20 item 3, a faster round: each change gives the same numbers as the loop it replaces."""

import pytest
import torch
from peft import LoraConfig

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora


TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_v_proj"]
PROMPTS = {"a": ["red cube", "two cats", "a blue ball"], "b": ["sign saying hi", "neon text", "old poster"]}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    common = {"std": 0.1, "rank": 2, "shared_seed": 7, "specific_scale": 0.3}
    save_toy_lora(pipe, folder / "a", seed=1, **common)
    save_toy_lora(pipe, folder / "b", seed=2, **common)
    return {"a": str(folder / "a"), "b": str(folder / "b")}


def _trainer(tmp_path, teachers, **kwargs):
    args = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "resolution": 32,
        "num_inference_steps": 5,
        "per_device_train_batch_size": 2,
        "max_sequence_length": 1,
        "save_strategy": "no",
        "ema": False,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        **kwargs,
    }
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        teachers,
        args=DiffusionOPDConfig(**args),
        train_dataset=PROMPTS,
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS),
    )
    # A student away from the base (LoRA B = 0 at init would make every lora_A gradient 0).
    generator = torch.Generator().manual_seed(3)
    for name, param in trainer.model.named_parameters():
        if ".student." in name and "lora_B" in name:
            param.data.normal_(0, 0.1, generator=generator)
    return trainer


def _round(trainer, task, rows, fused):
    """One task's loss and backward with or without the fused pass: (loss, KL per step, student grads, calls)."""
    trainer.args.fused_rollout = fused
    model = trainer.model
    model.zero_grad(set_to_none=True)
    calls = []
    velocity = trainer.family.velocity

    def counted(transformer, x, *args, **kwargs):
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return velocity(transformer, x, *args, **kwargs)

    trainer.family.velocity = counted
    try:
        loss, kl = trainer.task_loss(model, task, rows, trainer._generator(0, 0, task), backward=True)
    finally:
        trainer.family.velocity = velocity
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, kl, grads, calls


@pytest.mark.parametrize(
    "case",
    [
        {"noise_level": 0.0},  # ODE, CFG 4.5, all trained steps in one call
        {"noise_level": 0.7, "timestep_fraction": 0.6, "step_batch_size": 2},  # SDE, 3 of 5 steps, chunks 2 + 1
        {"noise_level": 0.5, "sde_type": "cps", "loss_type": "ppo", "step_batch_size": 1},
        {"noise_level": 0.0, "task_prompt_templates": {"a": "{prompt}, zz"}},  # the student sees other prompts
    ],
    ids=["ode", "sde-fraction-chunks", "cps-ppo", "ode-student-template"],
)
def test_fused_rollout_gradient_equals_two_pass(tmp_path, teachers, case):
    trainer = _trainer(tmp_path, teachers, guidance_scale=4.5, **case)
    rows = [{"prompt": "red cube"}, {"prompt": "two cats", "teachers": ["a", "b"]}]  # an own and a routed ensemble
    loss_2, kl_2, grads_2, calls_2 = _round(trainer, "a", rows, fused=False)
    loss_1, kl_1, grads_1, calls_1 = _round(trainer, "a", rows, fused=True)

    student = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert loss_2 > 0 and set(grads_1) == set(grads_2) == student
    assert [n for n, g in grads_2.items() if not g.abs().max() > 0] == []
    # Equal up to float32 summation order (the student runs B rows per call instead of T x B): relative error of
    # each gradient tensor, measured at <= 2e-6 on these cases.
    errors = {n: ((grads_1[n] - g).norm() / g.norm()).item() for n, g in grads_2.items()}
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda item: item[1])
    torch.testing.assert_close(kl_1, kl_2, rtol=1e-5, atol=0)
    assert loss_1 == pytest.approx(loss_2, rel=1e-5)

    n, t = trainer.args.num_inference_steps, trainer.args.num_train_timesteps
    chunks = len(trainer._chunks(t))
    # Two-pass: N no-grad rollout calls, then per chunk one call per teacher and one student call with grad.
    assert [grad for _, grad in calls_2].count(True) == chunks and len(calls_2) == n + 3 * chunks
    # Fused: T student calls with grad at B rows (the rollout itself), the teachers per chunk, nothing after step T.
    assert [c for c in calls_1 if c[1]] == [(2, True)] * t
    assert len(calls_1) == t + 2 * chunks


def test_evaluation_uses_the_no_grad_rollout_either_way(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, noise_level=0.7)
    kl = {}
    for fused in (True, False):
        trainer.args.fused_rollout = fused
        kl[fused] = trainer.compute_teacher_kl(PROMPTS)
    assert kl[True] == kl[False] and all(v > 0 for v in kl[True].values())


def test_choose_step_batch_size_fits_the_activations_in_free_memory():
    from trl_diffusion_opd.trainer.base_trainer import choose_step_batch_size

    gib = 2**30
    # 3 prompts x 2 GiB = 6 GiB per step; 80% of 40 GiB = 32 GiB holds 5 steps
    size, reason = choose_step_batch_size(9, 3, 2 * gib, 40 * gib)
    assert size == 5 and reason.startswith("5 of 9 trained steps per call") and "40 GiB free" in reason
    assert choose_step_batch_size(9, 3, 2 * gib, 1000 * gib)[0] == 9  # everything fits: all steps in one call
    size, reason = choose_step_batch_size(9, 3, 2 * gib, 4 * gib)  # not even one step: 1, and says so
    assert size == 1 and "may not fit" in reason
    assert choose_step_batch_size(9, 3, 2 * gib, 7.5 * gib, fraction=1.0)[0] == 1
    assert choose_step_batch_size(9, 3, 2 * gib, 12 * gib, fraction=1.0)[0] == 2


def test_auto_step_batch_size_measures_one_pass_and_chunks_the_round(tmp_path, teachers, monkeypatch):
    from trl_diffusion_opd.trainer import opd_trainer

    trainer = _trainer(tmp_path, teachers, step_batch_size="auto", timestep_fraction=0.8)  # T = 4
    per_prompt = trainer._saved_bytes_per_prompt()
    assert per_prompt > 0
    # Free memory for 2.5 steps of 2 prompts at 80%: chunks of 2 steps.
    monkeypatch.setattr(opd_trainer, "free_memory_bytes", lambda device: 2.5 * 2 * per_prompt / 0.8)
    lines = []
    monkeypatch.setattr(opd_trainer.logger, "warning", lines.append)
    assert trainer._chunks(4) == [range(0, 2), range(2, 4)]
    assert trainer._chunks(4) == [range(0, 2), range(2, 4)] and len(lines) == 1  # chosen once
    assert lines[0].startswith("step_batch_size='auto': 2 of 4 trained steps per call")
    trainer.train()
    assert trainer.state.global_step == 1


def test_auto_step_batch_size_probes_with_the_largest_input_image(tmp_path, monkeypatch):
    """With editing rows the memory probe runs on the row with the largest conditioning (the most input images, then
    pixels: reference tokens lengthen every pass), so the chosen chunk is computed from the longer sequence."""
    from trl_diffusion_opd.trainer import opd_trainer

    from helpers import FLUX_KONTEXT

    teachers = FLUX_KONTEXT.save_teachers(FLUX_KONTEXT.build(seed=0), tmp_path, 1)
    edits = FLUX_KONTEXT.trainer(tmp_path / "edit", teachers=teachers, step_batch_size="auto")
    # The rows' references are 32 x 40 and 48 x 32 pixels: the 48 x 32 one ("make it blue") has the most tokens.
    assert edits._probe_row()["prompt"] == "make it blue" == FLUX_KONTEXT.train["edit"][2]["prompt"]
    text = FLUX_KONTEXT.trainer(tmp_path / "text", teachers=teachers, step_batch_size="auto")
    text.task_prompts = {"edit": [{"prompt": row["prompt"], "image": None} for row in FLUX_KONTEXT.train["edit"]]}
    assert text._probe_row() is None
    with_image, text_only = edits._saved_bytes_per_prompt(), text._saved_bytes_per_prompt()
    # 96 output + 96 reference + 32 text tokens against 96 + 32: the reference's activations are saved too.
    assert with_image > 1.3 * text_only
    # Free memory for 2.5 text-only steps of 2 prompts at 80%: 2 steps per call without images, 1 with them.
    free = 2.5 * 2 * text_only / 0.8
    monkeypatch.setattr(opd_trainer, "free_memory_bytes", lambda device: free)
    lines = []
    monkeypatch.setattr(opd_trainer.logger, "warning", lines.append)
    assert text._chunks(4) == [range(0, 2), range(2, 4)]
    assert edits._chunks(4) == [range(k, k + 1) for k in range(4)]
    assert "measured on the row 'make it blue' with its input image(s)" in lines[1]


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("3", 3), (2, 2), (None, None)])
def test_step_batch_size_accepts_auto_and_integers(tmp_path, value, expected):
    assert DiffusionOPDConfig(str(tmp_path), step_batch_size=value).step_batch_size == expected


@pytest.mark.parametrize("value", ["many", 0, "0"])
def test_step_batch_size_rejects_other_values(tmp_path, value):
    with pytest.raises(ValueError, match="step_batch_size"):
        DiffusionOPDConfig(str(tmp_path), step_batch_size=value)


def test_a_round_reads_back_from_the_device_once_per_task(tmp_path, teachers):
    """The read-backs (`.item()`, `.tolist()`, `bool()`, `nonzero()`, ...) the package makes in a training round, by
    function: on a GPU only the task's loss (`task_loss` item, once per task) and the metrics at logging (`log`
    tolist) read device tensors; the others read host tensors (the sigma schedule, the routing weights)."""
    from benchmarks.host_syncs import count_host_syncs

    trainer = _trainer(tmp_path, teachers, noise_level=0.7, timestep_fraction=0.8, step_batch_size=3)  # T=4: 3 + 1
    with count_host_syncs() as counts:
        trainer.train()
    ours = {}
    for key, calls in counts.items():
        if key.startswith("trl_diffusion_opd/"):
            name = f"{key.split('(')[1].split(')')[0]} {key.split()[-1]}"
            ours[name] = ours.get(name, 0) + calls
    tasks, chunks, steps, teachers_per_chunk = 2, 2, 4, 1
    assert ours == {
        "_rollout_begin tolist": tasks,  # host: the schedule as floats
        "_rollout_begin item": tasks,  # host: t_guard
        "task_loss item": 2 * tasks,  # host: t_guard; device: the task's loss (and its finiteness)
        "_supervision nonzero": (teachers_per_chunk + 1) * chunks * tasks,  # host: routing subsets
        "_fused_rollout_step __bool__": steps * tasks,  # host: whether a step is supervised
        "log tolist": 1,  # device: all metrics at once, at logging
    }
