"""Scaling DiffusionOPD to many teachers: mixed-task rounds, host-resident LoRA teachers, single-query supervision,
anchor teachers and a guidance-free student supervised by CFG teachers."""

import collections
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer
from trl_diffusion_opd.data import MixedTaskPrompts
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora


TASKS = ["t0", "t1", "t2", "t3"]
PROMPTS = {task: [f"{task} prompt {i}" for i in range(6)] for task in TASKS}


def _config(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "resolution": 32,
        "num_inference_steps": 4,
        "per_device_train_batch_size": 2,
        "max_sequence_length": 1,
        "learning_rate": 3e-3,
        "save_strategy": "no",
        "ema": False,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    paths = {}
    for index, task in enumerate(TASKS):
        save_toy_lora(pipe, folder / task, seed=10 + index, rank=2, std=0.2)
        paths[task] = str(folder / task)
    return paths


def _trainer(tmp_path, teachers, tasks=TASKS, prompts=None, **kwargs):
    return DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {task: teachers[task] for task in tasks},
        args=_config(tmp_path, **kwargs),
        train_dataset=prompts or {task: PROMPTS[task] for task in tasks},
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["attn.to_q"]),
    )


def _grads(trainer):
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _zero_grads(trainer):
    for p in trainer.model.parameters():
        p.grad = None


def _rows(task, n=2):
    return [{"prompt": p} for p in PROMPTS[task][:n]]


# ---------------------------------------------------------------------------------------------- mixed-task rounds
def test_mixed_batch_of_one_task_equals_that_task_loss(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, tasks=["t0", "t1"], tasks_per_round=1)
    model = trainer.model
    loss, kl = trainer.task_loss(model, "t0", _rows("t0"), trainer._generator("g"), True)
    plain = _grads(trainer)
    _zero_grads(trainer)
    mixed, mixed_kl = trainer.task_loss(model, "mixed", _rows("t0"), trainer._generator("g"), True, ["t0", "t0"])
    assert mixed == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(mixed_kl, kl)
    for name, grad in _grads(trainer).items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-9)


def test_mixed_round_runs_one_pass_per_visited_teacher(tmp_path, teachers, monkeypatch):
    trainer = _trainer(tmp_path, teachers, tasks_per_round=2, rows_per_round=4)
    calls = []
    original = trainer.teacher_means
    monkeypatch.setattr(
        trainer,
        "teacher_means",
        lambda spec, task, x, *a: calls.append((spec.name, x.shape[0])) or original(spec, task, x, *a),
    )
    inputs = trainer.get_train_dataloader().dataset[0]
    assert sum(len(rows) for rows in inputs.values()) == 4 and len(inputs) == 2
    trainer.training_step(trainer.model, inputs)
    steps = trainer.args.num_train_timesteps
    # one teacher pass per drawn task's adapter over all its rows and steps; the other tasks' teachers never run
    assert sorted(calls) == sorted((task, steps * 2) for task in inputs)
    assert set(trainer._metrics) >= {f"kl/{task}" for task in inputs}


def test_mixed_task_rows_weigh_their_task_weight_over_their_rows(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, tasks=["t0", "t1"], tasks_per_round=2, task_weights={"t0": 3.0})
    scales = trainer._row_scales(["t0", "t1", "t1", "t1"], torch.tensor([2.0, 2.0, 2.0, 2.0]))
    torch.testing.assert_close(scales, torch.tensor([3.0 / 2, 1 / 6, 1 / 6, 1 / 6]))


def test_mixed_prompts_cover_tasks_and_replay_exactly():
    prompts = {task: [{"prompt": f"{task}{i}"} for i in range(5)] for task in "abcd"}
    rounds = MixedTaskPrompts(prompts, tasks_per_round=2, rows_per_round=3, num_processes=1, seed=0)
    items = [rounds[i] for i in range(40)]
    assert all(len(item) == 2 and sum(map(len, item.values())) == 3 for item in items)
    # a fresh instance (a resumed run) gives the same item at any index, without replaying from its own start
    assert MixedTaskPrompts(prompts, 2, 3, 1, 0)[37] == items[37]
    # each task cycles through its prompts: no repeat before all of its prompts were seen
    seen = collections.defaultdict(list)
    for item in items:
        for task, rows in item.items():
            seen[task] += [row["prompt"] for row in rows]
    for task, order in seen.items():
        assert sorted(order[:5]) == [f"{task}{i}" for i in range(5)]
    counts = collections.Counter(task for item in items for task in item)
    assert min(counts.values()) >= 10  # uniform draws: 20 expected per task


def test_weighted_task_draws_follow_task_weights():
    prompts = {task: [{"prompt": task}] for task in "ab"}
    rounds = MixedTaskPrompts(prompts, 1, 1, 1, seed=0, weights={"a": 3.0, "b": 1.0})
    share = sum("a" in rounds[i] for i in range(2000)) / 2000
    assert share == pytest.approx(0.75, abs=0.03)


def test_default_round_is_round_robin_over_every_task(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, tasks=["t0", "t1"])
    item = trainer.get_train_dataloader().dataset[0]
    assert list(item) == ["t0", "t1"] and all(len(rows) == 2 for rows in item.values())


# ---------------------------------------------------------------------------------------------- host residency
def test_host_resident_teachers_give_identical_losses_and_gradients(tmp_path, teachers):
    results = []
    for budget in (None, 2):
        trainer = _trainer(tmp_path / str(budget), teachers, max_teachers_on_device=budget)
        losses = [
            trainer.task_loss(trainer.model, task, _rows(task), trainer._generator(task), True)[0]
            for task in TASKS + TASKS[:1]  # t0 again after it was evicted
        ]
        results.append((losses, _grads(trainer), trainer))
    (plain, plain_grads, _), (hosted, hosted_grads, trainer) = results
    assert hosted == plain
    assert plain_grads.keys() == hosted_grads.keys()
    assert all(torch.equal(plain_grads[n], hosted_grads[n]) for n in plain_grads)
    bank = trainer.adapters.bank
    assert list(bank.resident) == ["t3", "t0"]  # the two most recently used
    assert bank.copies == 5  # t0 came back once
    assert bank.resident_bytes() == 2 * bank.teacher_bytes("t0")  # the evicted teachers have no device copy


# ---------------------------------------------------------------------------------------------- teacher bank
@pytest.mark.parametrize("budget", [None, 1])
def test_bank_teachers_equal_each_teacher_loaded_as_its_own_adapter(tmp_path, teachers, budget):
    """Teachers of two layouts (rank 2 on the attention projections; rank 3, alpha 6, on `to_q` and `to_k` in
    PEFT format) share two slot adapters; each one's velocity is bit-identical to the base with that teacher loaded
    as a PEFT adapter of its own, in any order of switches; with a budget of one teacher on the device too (its
    buffers reused by the next teacher of its layout, dropped for another layout)."""
    from trl_diffusion_opd.teachers import load_lora_teacher, parse_teacher_spec, resolve_teacher

    pipe = get_tiny_sd3_pipeline(with_t5=False)
    extra = {}
    for index in range(2):
        folder = tmp_path / f"other{index}"
        save_toy_lora(
            pipe,
            folder,
            seed=40 + index,
            rank=3,
            lora_alpha=6,
            target_modules=["to_q", "to_k"],
            format="peft",
            std=0.2,
        )
        extra[f"o{index}"] = str(folder)
    paths = {**teachers, **extra}
    prompts = {task: [f"{task} prompt"] for task in paths}
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        paths,
        args=_config(tmp_path, max_teachers_on_device=budget),
        train_dataset=prompts,
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["attn.to_q"]),
    )
    bank = trainer.teacher_bank
    model = trainer.model
    assert sorted(model.peft_config) == ["student", "teacher_slot_0", "teacher_slot_1"]
    assert not [n for n, _ in model.named_parameters() if "teacher_slot" in n]  # no parameters: buffers
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    sigma = torch.tensor([0.7])
    cond = trainer.prompt_cache(["a prompt"])
    reference = get_tiny_sd3_pipeline(with_t5=False).transformer.eval()
    for name in ("t1", "o0", "t0", "o1", "t1", "t2", "o1", "o0"):
        with torch.no_grad(), trainer.adapters.use(name):
            got = trainer.family.velocity(model, x, sigma, cond, 1.0, None)
        if budget:
            assert bank.resident == [name] and bank.resident_bytes() == bank.teacher_bytes(name)
        spec = parse_teacher_spec(name, paths[name])
        if name not in getattr(reference, "peft_config", {}):
            load_lora_teacher(reference, spec, resolve_teacher(spec))
        reference.set_adapter(name)
        with torch.no_grad():
            want = trainer.family.velocity(reference, x, sigma, cond, 1.0, None)
        assert torch.equal(got, want), name
    with torch.no_grad():
        student = trainer.family.velocity(model, x, sigma, cond, 1.0, None)
    assert not torch.equal(student, want)  # the student is back


def test_teachers_add_no_modules_and_only_their_bytes(tmp_path, teachers):
    """Three or thirty teachers of one layout: the same modules, parameters and adapters on the model; the bank
    grows by exactly the teachers' weight bytes."""
    import shutil

    many = {}
    for index in range(30):
        many[f"m{index:02d}"] = str(shutil.copytree(teachers[TASKS[index % 4]], tmp_path / "many" / str(index)))
    built = {}
    for count in (3, 30):
        paths = dict(list(many.items())[:count])
        trainer = _trainer(tmp_path / str(count), many, tasks=list(paths), prompts={t: ["p"] for t in paths})
        built[count] = trainer
    small, large = built[3].model, built[30].model
    assert len(list(small.modules())) == len(list(large.modules()))
    assert [n for n, _ in small.named_parameters()] == [n for n, _ in large.named_parameters()]
    bank = built[30].teacher_bank
    per_teacher = bank.teacher_bytes("m00")
    stored = load_file(str(Path(many["m00"]) / "pytorch_lora_weights.safetensors"))
    assert per_teacher == sum(t.numel() * 4 for t in stored.values()) > 0  # its file's weights, in float32
    assert bank.resident_bytes() == 30 * per_teacher
    assert built[3].teacher_bank.resident_bytes() == 3 * per_teacher


def test_teacher_switches_keep_only_the_student_trainable(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, tasks=["t0", "t1"])
    for name in ("t0", None, "t1"):
        with trainer.adapters.use(name):
            pass
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".student." in n for n in trainable)
    assert all(
        layer.active_adapters == ["student"] and not layer.disable_adapters for layer in trainer.adapters.layers
    )


# ---------------------------------------------------------------------------------------------- single query
def test_single_query_touches_one_state_per_row(tmp_path, teachers, monkeypatch):
    trainer = _trainer(tmp_path, teachers, tasks=["t0", "t1"], query_mode="single", query_sigma_range=[0.0, 0.7])
    allowed = trainer.query_steps("t0")
    sigmas = trainer.family.sigmas(4, 32)
    assert allowed and all(0.0 <= sigmas[j] <= 0.7 for j in allowed)
    assert len(allowed) < trainer.args.num_train_timesteps  # the range leaves out the high-noise states
    teacher_rows, student_rows = [], []
    original_velocity, original_teacher = trainer._velocity, trainer.teacher_velocity

    def velocity(transformer, x, t, *args):
        if torch.is_grad_enabled():
            student_rows.append(t.tolist())
        return original_velocity(transformer, x, t, *args)

    def teacher(spec, task, x, t, cond):
        teacher_rows.append(t.tolist())
        return original_teacher(spec, task, x, t, cond)

    monkeypatch.setattr(trainer, "_velocity", velocity)
    monkeypatch.setattr(trainer, "teacher_velocity", teacher)
    rows = [{"prompt": p} for p in PROMPTS["t0"][:3]]
    loss, mse = trainer.single_query_loss(trainer.model, "t0", rows, trainer._generator("q"), True)
    # one teacher pass and one student pass with grad, each over the three rows at one low-noise state per row
    assert len(teacher_rows) == 1 and len(student_rows) == 1
    assert teacher_rows[0] == student_rows[0] and len(student_rows[0]) == 3
    assert all(any(abs(s - float(sigmas[j])) < 1e-6 for j in allowed) for s in student_rows[0])
    assert loss == pytest.approx(mse.mean().item(), rel=1e-6) and loss > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.student_parameters)


def test_single_query_round_trains_the_student(tmp_path, teachers):
    trainer = _trainer(
        tmp_path,
        teachers,
        tasks=["t0", "t1"],
        query_mode="single",
        query_sigma_range="0,0.9",
        tasks_per_round=2,
        max_steps=2,
    )
    before = [p.detach().clone() for p in trainer.student_parameters]
    trainer.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.student_parameters))
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"mse/t0", "mse/t1", "loss/mixed"} <= logged


def test_single_query_range_without_states_fails(tmp_path, teachers):
    with pytest.raises(ValueError, match="holds none of the trained states"):
        _trainer(tmp_path, teachers, tasks=["t0"], query_mode="single", query_sigma_range="0.9,0.95")


# ---------------------------------------------------------------------------------------------- anchor teacher
def test_anchor_weight_shows_in_every_row(tmp_path, teachers):
    ensemble = {
        "t0": teachers["t0"],
        "t1": [{"path": teachers["t1"], "weight": 1}, {"path": teachers["t2"], "weight": 3}],
    }
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        ensemble,
        args=_config(tmp_path, anchor_teacher=teachers["t3"], anchor_weight=0.2),
        train_dataset={"t0": PROMPTS["t0"], "t1": PROMPTS["t1"]},
    )
    names, weights = trainer._routing("mixed", [{"prompt": "x"}, {"prompt": "y"}], ["t0", "t1"])
    assert [spec.name for _, spec in names] == ["t0", "t1_0", "t1_1", "anchor"]
    torch.testing.assert_close(weights, torch.tensor([[0.8, 0, 0, 0.2], [0, 0.2, 0.6, 0.2]]))


def test_base_anchor_at_the_student_guidance_pulls_a_base_student_nowhere(tmp_path, teachers):
    # The student starts as the base (its LoRA's B is 0) and the anchor is the base at the student's CFG: the
    # anchor's share of the loss is exactly 0, so the anchored loss is (1 - weight) x the plain one.
    losses = {}
    for anchor in (None, "base"):
        trainer = DiffusionOPDTrainer(
            get_tiny_sd3_pipeline(with_t5=False),
            {"t0": teachers["t0"]},
            args=_config(tmp_path / str(anchor), anchor_teacher=anchor, anchor_weight=0.3, guidance_scale=2.0),
            train_dataset={"t0": PROMPTS["t0"]},
        )
        losses[anchor] = trainer.task_loss(trainer.model, "t0", _rows("t0"), trainer._generator("a"), False)[0]
    assert losses[None] > 0
    assert losses["base"] == pytest.approx(0.7 * losses[None], rel=1e-5)


def test_anchor_named_like_a_teacher_fails(tmp_path, teachers):
    with pytest.raises(ValueError, match="`anchor_teacher` is named 'base'"):
        DiffusionOPDTrainer(
            get_tiny_sd3_pipeline(with_t5=False),
            {"base": teachers["t0"]},
            args=_config(tmp_path, anchor_teacher="base"),
            train_dataset={"base": PROMPTS["t0"]},
        )


# ---------------------------------------------------------------------------------------------- guidance-free student
def test_guidance_free_student_config_moves_the_cfg_to_the_teachers(tmp_path):
    args = _config(tmp_path, guidance_free_student=True, guidance_scale=4.5)
    assert args.guidance_scale == 1.0 and args.teacher_guidance_for("any") == 4.5
    again = DiffusionOPDConfig(**{**args.to_dict(), "output_dir": args.output_dir})  # a saved config reloads as is
    assert again.guidance_scale == 1.0 and again.teacher_guidance_for("any") == 4.5


def test_guidance_free_student_card_says_to_sample_without_cfg(tmp_path, teachers):
    trainer = _trainer(tmp_path, teachers, tasks=["t0"], guidance_free_student=True, guidance_scale=4.5)
    trainer.create_model_card(output_dir=str(tmp_path / "card"))
    card = (tmp_path / "card" / "README.md").read_text()
    quick_start = card.split("## Quick start")[1].split("```")[1]
    assert "guidance_scale=1.0" in quick_start
    assert "sample it with `guidance_scale=1.0`" in card


@pytest.mark.parametrize("seed", [0, 1])
def test_cfg_absorbed_student_without_cfg_moves_towards_the_cfg_teacher(tmp_path, teachers, seed):
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {"t0": teachers["t0"]},
        args=_config(
            tmp_path, guidance_free_student=True, guidance_scale=3.0, max_steps=40, learning_rate=5e-3, seed=seed
        ),
        train_dataset={"t0": PROMPTS["t0"]},
    )
    held_out = {"t0": PROMPTS["t0"][:3]}
    # the KL of the student's rollouts without CFG to the teacher with CFG 3
    before = trainer.compute_teacher_kl(held_out)["t0"]
    trainer.train()
    after = trainer.compute_teacher_kl(held_out)["t0"]
    # measured after / before: 0.095, 0.103, 0.101, 0.101 for seeds 0-3
    assert after < 0.25 * before, (before, after)
