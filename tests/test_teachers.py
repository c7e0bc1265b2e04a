"""Teacher specs, weighted teacher ensembles and heterogeneous LoRA teachers on one shared base (issue #8).

Covers: the spec syntax shared by Python, YAML and the command line (every accepted form parsed, every malformed one
refused with a message listing the accepted forms); the ensemble loss Σ_k w_k KL(p_S ‖ p_Tk) / Σ_k w_k, whose
minimiser is the weighted mean of the teachers' means; per-teacher guidance scales; teachers of different ranks,
alphas and targets loaded side by side reproducing their own predictions exactly; and an ensemble distillation run.
"""

import json

import pytest
import torch
import yaml
from peft import LoraConfig

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer, transition
from trl_diffusion_opd.families.base import cond_tile
from trl_diffusion_opd.lora_io import read_lora_folder
from trl_diffusion_opd.scripts.train import DiffusionOPDScriptArguments
from trl_diffusion_opd.teachers import (
    SPEC_FORMS,
    AdapterSwitch,
    TeacherSpec,
    load_lora_teacher,
    parse_teacher_spec,
    parse_teachers,
    resolve_teacher,
)
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora


TRAIN_PROMPTS = ["a red circle", "two cats", "a blue square", "the word hello", "a green tree", "three dogs"]
EVAL_PROMPTS = ["a yellow star", "one bird", "a purple cube", "the word cat"]
STUDENT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Three heterogeneous teachers: (rank, alpha, target modules).
HETEROGENEOUS = {
    "small": (2, 4, ["attn.to_q", "attn.to_v"]),
    "medium": (8, 4, ["attn.to_k", "attn.to_out.0", "attn.add_k_proj"]),
    "large": (16, 32, ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj"]),
}


def _args(output_dir, **kwargs) -> DiffusionOPDConfig:
    defaults = {
        "output_dir": str(output_dir),
        "max_steps": 1,
        "resolution": 32,
        "num_inference_steps": 4,
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "max_sequence_length": 1,
        "learning_rate": 3e-3,
        "save_strategy": "no",
        "ema": False,
        "disable_tqdm": True,
        "lr_scheduler_type": "constant",
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


def _student_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=STUDENT_TARGETS)


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny transformer is fastest on one thread, and far less sensitive to other processes sharing the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def heterogeneous_folders(tmp_path_factory):
    """The three heterogeneous teachers in diffusers format, and `medium` in PEFT format too."""
    root = tmp_path_factory.mktemp("heterogeneous")
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    folders = {
        name: save_toy_lora(
            pipe, root / name, seed=11 + i, rank=rank, lora_alpha=alpha, target_modules=targets, std=0.2
        )
        for i, (name, (rank, alpha, targets)) in enumerate(HETEROGENEOUS.items())
    }
    rank, alpha, targets = HETEROGENEOUS["medium"]
    folders["medium_peft"] = save_toy_lora(
        pipe,
        root / "medium_peft",
        seed=12,
        rank=rank,
        lora_alpha=alpha,
        target_modules=targets,
        std=0.2,
        format="peft",
    )
    return folders


# ---------------------------------------------------------------------------------------------------------- specs
ACCEPTED = [
    ("owner/repo", ("owner/repo", None, None)),
    ("owner/repo/sub/folder", ("owner/repo", "sub/folder", None)),
    ("owner/repo@v1.0", ("owner/repo", None, "v1.0")),
    ("owner/repo/sub/folder@0123abc", ("owner/repo", "sub/folder", "0123abc")),
    ("quanhaol/DiffusionOPD/OCRTeacher/lora", ("quanhaol/DiffusionOPD", "OCRTeacher/lora", None)),
    ("my-org/my_repo.v2@refs/pr/3", ("my-org/my_repo.v2", None, "refs/pr/3")),  # Hub revisions may hold '/'
    ("  owner/repo  ", ("owner/repo", None, None)),
]


@pytest.mark.parametrize("text, fields", ACCEPTED, ids=[a for a, _ in ACCEPTED])
def test_hub_spec_forms_are_parsed(text, fields):
    spec = parse_teacher_spec("ocr", text)
    assert (spec.name, spec.path, spec.subfolder, spec.revision) == ("ocr", *fields)
    assert (spec.guidance_scale, spec.weight, spec.weight_name) == (None, 1.0, None)
    assert spec.display == text.strip()


def test_local_spec_forms_are_parsed(tmp_path, monkeypatch):
    folder = tmp_path / "teachers" / "ocr"
    folder.mkdir(parents=True)
    assert parse_teacher_spec("ocr", str(folder)).path == str(folder)  # absolute
    monkeypatch.chdir(tmp_path)
    for text in ("./teachers/ocr", "teachers/ocr"):  # an existing relative folder wins over a Hub id
        spec = parse_teacher_spec("ocr", text)
        assert (spec.path, spec.subfolder, spec.revision) == (text, None, None)
        assert spec.is_local and resolve_teacher(spec) == folder.relative_to(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_teacher_spec("ocr", "~/teachers/ocr").path == str(folder)
    spec = parse_teacher_spec("ocr", {"path": "./teachers", "subfolder": "ocr"})
    assert resolve_teacher(spec).resolve() == folder


def test_dict_spec_fields_are_parsed():
    spec = parse_teacher_spec(
        "aes",
        {
            "path": "quanhaol/DiffusionOPD",
            "subfolder": "AesTeacher/lora",
            "revision": "main",
            "guidance_scale": "7.5",  # numbers from the command line arrive as strings
            "weight": 2,
            "weight_name": "x.safetensors",
        },
    )
    assert spec == TeacherSpec("aes", "quanhaol/DiffusionOPD", "AesTeacher/lora", "main", 7.5, 2.0, "x.safetensors")
    inline = parse_teacher_spec("aes", {"path": "quanhaol/DiffusionOPD/AesTeacher/lora@main", "weight": 0.25})
    assert (inline.path, inline.subfolder, inline.revision, inline.weight) == (
        "quanhaol/DiffusionOPD",
        "AesTeacher/lora",
        "main",
        0.25,
    )
    # The same subfolder / revision inline and as a key is not a conflict.
    same = parse_teacher_spec("aes", {"path": "o/r/sub@v1", "subfolder": "sub", "revision": "v1"})
    assert (same.subfolder, same.revision) == ("sub", "v1")
    assert parse_teacher_spec("x", spec) is spec


REJECTED = [
    ("", "an empty string"),
    ("   ", "an empty string"),
    ("owner", "neither an existing local folder, a registered name nor a Hub id"),
    ("owner/repo@", "neither an existing local folder, a registered name nor a Hub id"),
    ("owner//repo", "neither an existing local folder, a registered name nor a Hub id"),
    ("owner/repo/", "neither an existing local folder, a registered name nor a Hub id"),
    ("a b/c", "neither an existing local folder, a registered name nor a Hub id"),
    ("owner/repo@a@b", "neither an existing local folder, a registered name nor a Hub id"),
    ("-owner/repo", "neither an existing local folder, a registered name nor a Hub id"),
    ("/abs/does-not-exist", "local folder '/abs/does-not-exist' does not exist"),
    ("./does-not-exist", "local folder './does-not-exist' does not exist"),
    ({"subfolder": "lora"}, "no 'path'"),
    ({"path": "owner/repo", "weigth": 2}, "unknown keys ['weigth']"),
    ({"path": ""}, "'path' must be a non-empty string"),
    ({"path": 5}, "'path' must be a non-empty string"),
    ({"path": "owner/repo", "revision": 1234567}, "'revision' must be a non-empty string (quote it in YAML)"),
    ({"path": "owner/repo", "weight": 0}, "'weight' must be a finite number > 0, got 0"),
    ({"path": "owner/repo", "weight": -1.5}, "'weight' must be a finite number > 0, got -1.5"),
    ({"path": "owner/repo", "weight": "heavy"}, "'weight' must be a number, got 'heavy'"),
    ({"path": "owner/repo", "weight": True}, "'weight' must be a number, got True"),
    ({"path": "owner/repo", "guidance_scale": float("nan")}, "'guidance_scale' must be a finite number, got nan"),
    ({"path": "owner/repo/a", "subfolder": "b"}, "'subfolder' is given twice: 'a' in 'path' and 'b'"),
    ({"path": "owner/repo@v1", "revision": "v2"}, "'revision' is given twice: 'v1' in 'path' and 'v2'"),
    (3, "type int, not a string or a dict"),
    (None, "type NoneType, not a string or a dict"),
    (["owner/repo"], "type list, not a string or a dict"),
]


@pytest.mark.parametrize("spec, problem", REJECTED, ids=[repr(s) for s, _ in REJECTED])
def test_malformed_spec_is_refused_with_the_accepted_forms(spec, problem):
    with pytest.raises(ValueError) as error:
        parse_teacher_spec("ocr", spec)
    message = str(error.value)
    assert message.startswith(f"Teacher 'ocr': malformed spec {spec!r} (")
    assert problem in message
    assert message.endswith(f"Accepted forms: {SPEC_FORMS}.")
    for form in ("'owner/repo@revision'", "'owner/repo/sub/folder@revision'", "'./local/folder'", "a dict with"):
        assert form in message


def test_local_file_is_refused_with_a_hint(tmp_path):
    file = tmp_path / "teacher.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"a file, not a folder: give its folder, with \{'path': folder"):
        parse_teacher_spec("ocr", str(file))


def test_relative_path_that_is_not_a_folder_fails_at_resolve_with_a_hint(tmp_path, monkeypatch):
    from huggingface_hub import constants as hub_constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    spec = parse_teacher_spec("ocr", "teachers/ocr")  # no such folder: read as the Hub repo 'teachers/ocr'
    assert (spec.path, spec.subfolder) == ("teachers/ocr", None)
    with pytest.raises(ValueError, match=r"'teachers/ocr' is not a local folder either \(prefix a relative local"):
        resolve_teacher(spec, cache_dir=str(tmp_path / "cache"))


def test_python_yaml_and_command_line_specs_parse_identically():
    python = {
        "geneval": "quanhaol/DiffusionOPD/GenEvalTeacher/lora",
        "ocr": {"path": "quanhaol/DiffusionOPD/OCRTeacher/lora@main", "guidance_scale": 4.5},
        "aes": [
            {"path": "quanhaol/DiffusionOPD", "subfolder": "AesTeacher/lora", "weight": 0.7},
            {"path": "owner/aes-rank64@v2", "weight": 0.3, "name": "aes-r64"},
        ],
    }
    text = """
teachers:
  geneval: quanhaol/DiffusionOPD/GenEvalTeacher/lora
  ocr: {path: quanhaol/DiffusionOPD/OCRTeacher/lora@main, guidance_scale: 4.5}
  aes:
    - {path: quanhaol/DiffusionOPD, subfolder: AesTeacher/lora, weight: 0.7}
    - {path: owner/aes-rank64@v2, weight: 0.3, name: aes-r64}
"""
    from_yaml = yaml.safe_load(text)["teachers"]
    from_cli = DiffusionOPDScriptArguments(teachers=json.dumps(python), prompts='{"ocr": ["a"]}').teachers
    parsed = parse_teachers(python, reserved=("student",))
    assert parse_teachers(from_yaml, reserved=("student",)) == parsed
    assert parse_teachers(from_cli, reserved=("student",)) == parsed
    summary = {
        task: [(s.name, s.display, s.weight, s.guidance_scale) for s in specs] for task, specs in parsed.items()
    }
    assert summary == {
        "geneval": [("geneval", "quanhaol/DiffusionOPD/GenEvalTeacher/lora", 1.0, None)],
        "ocr": [("ocr", "quanhaol/DiffusionOPD/OCRTeacher/lora@main", 1.0, 4.5)],
        "aes": [
            ("aes_0", "quanhaol/DiffusionOPD/AesTeacher/lora", 0.7, None),
            ("aes_r64", "owner/aes-rank64@v2", 0.3, None),
        ],
    }


def test_parse_teachers_names_and_refusals():
    parsed = parse_teachers({"text.render": "o/r", "mix": ["o/a", "o/b"], "solo": ["o/c"]})
    assert [s.name for specs in parsed.values() for s in specs] == ["text_render", "mix_0", "mix_1", "solo"]
    with pytest.raises(ValueError, match="Teacher name 'student' .* reserved or used twice"):
        parse_teachers({"student": "o/r"}, reserved=("student",))
    with pytest.raises(ValueError, match="Teacher name 'lora_A' .* reserved"):
        parse_teachers({"lora_A": "o/r"})  # would match every adapter's `.lora_A.` parameters
    with pytest.raises(ValueError, match="Teacher name 'mix_0' .* used twice"):
        parse_teachers({"mix": ["o/a", "o/b"], "mix_0": "o/c"})
    with pytest.raises(ValueError, match="Task 'mix' has an empty teacher list. Accepted specs:"):
        parse_teachers({"mix": []})
    with pytest.raises(ValueError, match="non-empty dict"):
        parse_teachers({})
    with pytest.raises(ValueError, match="teacher 1 has 'name' ''"):
        parse_teachers({"mix": ["o/a", {"path": "o/b", "name": ""}]})
    with pytest.raises(ValueError, match=r"Teacher 'mix_1': malformed spec \['o/b'\] \(type list"):
        parse_teachers({"mix": ["o/a", ["o/b"]]})


# ------------------------------------------------------------------------------------------ heterogeneous teachers
def _velocity(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def _transformer_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 4, 16, 16, generator=generator),
        "timestep": torch.tensor([250.0, 900.0]),
        "encoder_hidden_states": torch.randn(2, 3, 64, generator=generator),
        "pooled_projections": torch.randn(2, 64, generator=generator),
    }


def test_heterogeneous_teachers_side_by_side_match_each_teacher_alone(heterogeneous_folders):
    """Ranks 2/8/16, alphas 4/4/32 and three different target lists on one transformer that also carries a
    (non-zero) student: each teacher's prediction equals plain diffusers `load_lora_weights` of that teacher alone."""
    inputs = _transformer_inputs()
    base_pipe = get_tiny_sd3_pipeline(with_t5=False)
    base = _velocity(base_pipe.transformer, inputs)
    expected = {}
    for name in HETEROGENEOUS:
        alone = get_tiny_sd3_pipeline(with_t5=False)
        alone.load_lora_weights(str(heterogeneous_folders[name]))
        expected[name] = _velocity(alone.transformer, inputs)
        assert (expected[name] - base).abs().max() > 1e-3  # each teacher really changes the prediction

    transformer = base_pipe.transformer
    for name in HETEROGENEOUS:
        spec = parse_teacher_spec(name, str(heterogeneous_folders[name]))
        load_lora_teacher(transformer, spec, resolve_teacher(spec))
    transformer.add_adapter(_student_config(), adapter_name="student")
    for param_name, param in transformer.named_parameters():
        if ".student." in param_name and ".lora_B." in param_name:
            torch.nn.init.normal_(param, std=0.1)  # a trained student, so that a leak would show
    switch = AdapterSwitch(transformer, "student")
    switch.activate("student")
    student = _velocity(transformer, inputs)
    assert (student - base).abs().max() > 1e-3

    for name in ["small", "large", "medium", "small"]:  # switching back and forth leaves nothing behind
        with switch.use(name):
            assert torch.equal(_velocity(transformer, inputs), expected[name]), name
        assert torch.equal(_velocity(transformer, inputs), student)
    with switch.use(None):
        torch.testing.assert_close(_velocity(transformer, inputs), base, rtol=0, atol=1e-6)

    for name, (rank, alpha, targets) in HETEROGENEOUS.items():
        config = transformer.peft_config[name]
        assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (rank, alpha, sorted(targets))
        adapted = sorted(
            n.removeprefix("transformer_blocks.").split(".", 1)[1]
            for n, m in transformer.named_modules()
            if name in getattr(m, "lora_A", {})
        )
        assert sorted(set(adapted)) == sorted(targets)
        module = transformer.get_submodule(f"transformer_blocks.0.{targets[0]}")
        assert module.scaling[name] == alpha / rank
        assert module.lora_A[name].weight.shape[0] == rank
    assert "small" not in transformer.get_submodule("transformer_blocks.0.attn.to_k").lora_A
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".student." in n for n in trainable)


def test_heterogeneous_teachers_through_the_trainer(heterogeneous_folders, tmp_path):
    """The same three teachers (one of them in PEFT format) as tasks of a trainer reproduce diffusers exactly."""
    inputs = _transformer_inputs(seed=1)
    expected = {}
    for name in HETEROGENEOUS:
        alone = get_tiny_sd3_pipeline(with_t5=False)
        alone.load_lora_weights(str(heterogeneous_folders[name]))
        expected[name] = _velocity(alone.transformer, inputs)
    teachers = {name: str(heterogeneous_folders[name]) for name in HETEROGENEOUS}
    teachers["medium"] = str(heterogeneous_folders["medium_peft"])  # same weights, PEFT format
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    trainer = DiffusionOPDTrainer(
        pipe,
        teachers,
        args=_args(tmp_path / "out"),
        train_dataset=dict.fromkeys(HETEROGENEOUS, TRAIN_PROMPTS[:2]),
        peft_config=_student_config(),
    )
    for name in HETEROGENEOUS:
        with trainer.adapters.use(name):
            assert torch.equal(_velocity(pipe.transformer, inputs), expected[name]), name
    # each teacher runs through the slot adapter of its layout, which adapts exactly its modules at its rank
    (medium,), (large,) = trainer.teacher_bank.activate("medium"), trainer.teacher_bank.activate("large")
    state, _ = read_lora_folder(heterogeneous_folders["medium"])
    assert {k.split(".lora_")[0] for k in state} == {
        n for n, m in pipe.transformer.named_modules() if medium in getattr(m, "lora_A", {})
    }
    assert {b.shape[0] for n, b in pipe.transformer.named_buffers() if f".lora_A.{large}." in n} == {16}


# ------------------------------------------------------------------------------------------------------ ensembles
def _ensemble_trainer(tmp_path, folders, weights, **kwargs) -> DiffusionOPDTrainer:
    specs = [{"path": str(folder), "weight": weight} for folder, weight in zip(folders, weights)]
    return DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {"mix": specs},
        args=_args(tmp_path / "out", **kwargs),
        train_dataset={"mix": TRAIN_PROMPTS},
        peft_config=_student_config(),
    )


@torch.no_grad()
def _state_and_means(trainer, prompts, seed):
    """The trained states of one eval rollout (as `compute_teacher_kl` samples them) and the means there."""
    args, task = trainer.args, "mix"
    cond = trainer.prompt_cache(prompts)
    rollout = trainer.rollout(cond, trainer._generator("eval", seed, task))
    t_guard = rollout["sigmas"][1].item()
    x, t, t_next = trainer._step_rows(rollout["states"], rollout["sigmas"], range(args.num_train_timesteps))
    rows_cond = cond_tile(cond, args.num_train_timesteps)
    teachers = [trainer.teacher_means(s, task, x, t, t_next, rows_cond, t_guard) for s in trainer.teacher_specs[task]]
    student = trainer._mean(trainer.model, x, t, t_next, rows_cond, trainer.student_guidance, t_guard)
    return {"x": x, "t": t, "t_next": t_next, "t_guard": t_guard, "teachers": teachers, "student": student}


def _ensemble_kl(trainer, state, mean) -> torch.Tensor:
    """Σ_k w_k KL(N(mean) ‖ N(μ_k)) / Σ_k w_k per row, written out independently of `task_loss`."""
    args = trainer.args
    specs = trainer.teacher_specs["mix"]
    total = sum(s.weight for s in specs)
    kls = [
        transition.closed_form_kl(
            mean,
            teacher,
            state["t"],
            state["t_next"],
            args.noise_level,
            args.sde_type,
            args.kl_normalization,
            state["t_guard"],
        )
        for teacher in state["teachers"]
    ]
    return sum(s.weight * kl for s, kl in zip(specs, kls)) / total


def _weighted_mean(trainer, state) -> torch.Tensor:
    specs = trainer.teacher_specs["mix"]
    return sum(s.weight * m for s, m in zip(specs, state["teachers"])) / sum(s.weight for s in specs)


def test_ensemble_minimiser_is_the_weighted_mean_of_teacher_means(heterogeneous_folders, tmp_path):
    """Shared covariances make Σ_k w_k KL(p_S ‖ p_Tk) a quadratic in μ_S minimised at Σ_k w_k μ_Tk / Σ_k w_k.

    On a fixed student state (SDE sampler, exact-KL normalisation), a free student mean is optimised to convergence
    against the ensemble loss built from `closed_form_kl` and the three real teachers' means; it lands on the weighted
    mean (not the plain mean, nor any teacher), the gradient vanishes there and nowhere else tried, and the trainer's
    own ensemble KL (`compute_teacher_kl`) equals the same weighted sum.
    """
    weights = [0.6, 0.3, 0.1]
    folders = [heterogeneous_folders[name] for name in HETEROGENEOUS]
    trainer = _ensemble_trainer(tmp_path, folders, weights, noise_level=0.7, kl_normalization="paper")
    assert [s.weight for s in trainer.teacher_specs["mix"]] == weights
    state = _state_and_means(trainer, EVAL_PROMPTS[:2], seed=3)
    target = _weighted_mean(trainer, state)
    plain = sum(state["teachers"]) / len(weights)
    assert (plain - target).abs().max() > 1e-3  # the weights matter
    assert min((m - target).abs().max().item() for m in state["teachers"]) > 1e-3  # no teacher is the optimum

    mean = state["student"].clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [mean], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=0, history_size=20
    )

    def closure():
        optimizer.zero_grad()
        loss = _ensemble_kl(trainer, state, mean).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert (mean.detach() - target).abs().max().item() < 1e-5

    def grad_norm(point):
        point = point.clone().requires_grad_(True)
        _ensemble_kl(trainer, state, point).sum().backward()
        return point.grad.norm().item()

    at_optimum = grad_norm(target)
    elsewhere = [grad_norm(p) for p in (plain, state["student"], *state["teachers"])]
    assert at_optimum < 1e-4 * min(elsewhere)
    floor = _ensemble_kl(trainer, state, target)
    for other in (plain, *state["teachers"]):
        assert (_ensemble_kl(trainer, state, other) > floor).all()

    # The trainer's ensemble KL is that weighted sum, at the student's own mean.
    reported = trainer.compute_teacher_kl({"mix": EVAL_PROMPTS[:2]}, seed=3)["mix"]
    by_hand = _ensemble_kl(trainer, state, state["student"]).mean().item()
    assert reported == pytest.approx(by_hand, rel=1e-5)
    single = [
        transition.closed_form_kl(
            state["student"], m, state["t"], state["t_next"], 0.7, "sde", "paper", state["t_guard"]
        ).mean()
        for m in state["teachers"]
    ]
    assert reported == pytest.approx(sum(w * kl.item() for w, kl in zip(weights, single)) / sum(weights), rel=1e-5)


def test_each_teacher_keeps_its_own_guidance_scale(heterogeneous_folders, tmp_path):
    """Two specs of one LoRA with guidance 1 and 6 (and a third without, using `teacher_guidance_scale`) give the
    means computed by hand with that guidance: v_u + g (v_c − v_u), or v_c alone for g = 1."""
    folder = str(heterogeneous_folders["large"])
    trainer = DiffusionOPDTrainer(
        get_tiny_sd3_pipeline(with_t5=False),
        {
            "mix": [
                {"path": folder, "guidance_scale": 1.0, "name": "plain"},
                {"path": folder, "guidance_scale": 6.0, "name": "strong"},
                {"path": folder, "name": "default"},
            ]
        },
        args=_args(tmp_path / "out", teacher_guidance_scale={"mix": 3.0}),
        train_dataset={"mix": TRAIN_PROMPTS},
        peft_config=_student_config(),
    )
    specs = {s.name: s for s in trainer.teacher_specs["mix"]}
    assert [specs[n].guidance_scale for n in ("plain", "strong", "default")] == [1.0, 6.0, None]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t, t_next = torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.3])
    cond = trainer.prompt_cache(EVAL_PROMPTS[:2])
    negative = trainer._negative(2)
    transformer = trainer.pipeline.transformer

    def by_hand(name, guidance):
        def call(c):
            with torch.no_grad(), trainer.adapters.use(name):
                return transformer(
                    hidden_states=x,
                    timestep=t * 1000,
                    encoder_hidden_states=c["prompt_embeds"],
                    pooled_projections=c["pooled_prompt_embeds"],
                    return_dict=False,
                )[0]

        v_cond = call(cond)
        v = v_cond if guidance == 1.0 else call(negative) + guidance * (v_cond - call(negative))
        return transition.step_mean(x, v, t, t_next)

    means = {name: trainer.teacher_means(spec, "mix", x, t, t_next, cond, 0.9) for name, spec in specs.items()}
    for name, guidance in (("plain", 1.0), ("strong", 6.0), ("default", 3.0)):
        torch.testing.assert_close(means[name], by_hand(name, guidance), rtol=0, atol=1e-5)
    for a, b in (("plain", "strong"), ("plain", "default"), ("strong", "default")):
        assert (means[a] - means[b]).abs().max() > 1e-2


def test_ensemble_distillation_closes_most_of_the_gap_to_the_ensemble_optimum(tmp_path):
    """An ensemble of three weighted teachers in one task, distilled for 100 steps on the tiny SD3 pipeline.

    What is asserted and why: within one task the best any student can do at a state is the weighted mean of the
    teachers' means, so the weighted KL cannot go below the *floor* Σ_k w_k KL(μ̄ ‖ μ_Tk) / Σ_k w_k (the weighted
    spread of the teachers, measured on the trained student's own held-out rollouts). The teachers share part of
    their update (`shared_seed`, like LoRAs fine-tuned from one base), which keeps the floor at ~15% of the initial KL.
    We assert that training removes ≥ 80% of the *reducible* KL, (before − after) / (before − floor) (measured: ~91%),
    that the raw weighted KL drops by ≥ 70% (measured: ~77%; ≥ 80% is impossible here, since the floor alone is
    ~15%), and that the student never beats the floor (it is a true lower bound at every state). With the student's
    seed 1 instead of 0: floor 14.6% of the initial KL, 91.6% of the reducible KL removed, raw drop 78.3%.
    """
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    folders = [
        save_toy_lora(pipe, tmp_path / f"teacher{seed}", seed=seed, rank=2, std=0.1, shared_seed=7, specific_scale=0.5)
        for seed in (1, 2, 3)
    ]
    trainer = _ensemble_trainer(tmp_path, folders, [0.5, 0.3, 0.2], max_steps=100, logging_steps=100)
    prompts = {"mix": EVAL_PROMPTS}
    before = trainer.compute_teacher_kl(prompts)["mix"]
    trainer.train()
    after = trainer.compute_teacher_kl(prompts)["mix"]
    state = _state_and_means(trainer, EVAL_PROMPTS, seed=0)
    assert _ensemble_kl(trainer, state, state["student"]).mean().item() == pytest.approx(after, rel=1e-5)
    floor = _ensemble_kl(trainer, state, _weighted_mean(trainer, state)).mean().item()
    assert 0 < floor < after < before
    assert floor / before < 0.2
    assert (before - after) / (before - floor) >= 0.8
    assert 1 - after / before >= 0.7


def test_saved_lora_files_do_not_depend_on_string_hashing(tmp_path):
    """peft keeps `target_modules` as a set; its order follows PYTHONHASHSEED, so without sorting two runs that
    train identical weights would write different adapter metadata. (The safetensors header's key order itself is
    not fixed across processes, so the files are compared by content, not byte for byte.)"""
    import os
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file

    from trl_diffusion_opd.lora_io import adapter_metadata

    targets = ["attn.to_v", "attn.to_q", "attn.add_k_proj", "attn.to_out.0"]
    assert adapter_metadata(LoraConfig(r=2, target_modules=targets))["target_modules"] == sorted(targets)
    script = (
        "import sys; from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora; "
        f"save_toy_lora(get_tiny_sd3_pipeline(), sys.argv[1], target_modules={targets!r})"
    )
    saved = []
    for hash_seed in ("1", "2", "3"):
        folder = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONWARNINGS": "ignore"}
        subprocess.run([sys.executable, "-c", script, str(folder)], check=True, env=env, capture_output=True)
        path = str(folder / "pytorch_lora_weights.safetensors")
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        saved.append((metadata, load_file(path)))
    (metadata, tensors), others = saved[0], saved[1:]
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.target_modules"] == sorted(targets)
    for other_metadata, other_tensors in others:
        assert other_metadata == metadata  # the JSON string itself, target_modules order included
        assert other_tensors.keys() == tensors.keys() and all(
            torch.equal(other_tensors[k], tensors[k]) for k in tensors
        )


def test_teacher_of_another_model_is_refused_with_an_example_key(tmp_path):
    """A LoRA for another model (a FLUX teacher on an SD3 base), or one of other sizes, is refused before anything is
    loaded, with the same one line as `eval` (`check_lora_fits`)."""
    from trl_diffusion_opd.testing import get_tiny_flux_pipeline

    base = get_tiny_sd3_pipeline(with_t5=False)
    cases = [
        (
            save_toy_lora(get_tiny_flux_pipeline(seed=0), tmp_path / "flux", seed=1),
            "3 of the 7 modules it adapts are not in its transformer, e.g. "
            "'single_transformer_blocks.0.attn.to_k.lora_A.weight'",
        ),
        (
            save_toy_lora(get_tiny_sd3_pipeline(with_t5=False, attention_head_dim=16), tmp_path / "wide", seed=1),
            "8 of the 8 modules it adapts have other sizes in its transformer, e.g. "
            "'transformer_blocks.0.attn.to_k.lora_A.weight' has 64 input features where the base has 32",
        ),
    ]
    for folder, problem in cases:
        spec = parse_teacher_spec("ocr", str(folder))
        with pytest.raises(ValueError) as error:
            load_lora_teacher(base.transformer, spec, folder)
        assert str(error.value) == (
            f"Teacher 'ocr' ({folder}) does not fit this base: {problem}. Is it a LoRA for another model?"
        )
    assert not [name for name, _ in base.transformer.named_modules() if "lora" in name]


def test_toy_teachers_from_python_are_the_train_commands(tmp_path):
    """`teachers={"a": "toy:1"}` works in Python as on the command line: the registered `toy` scheme writes a random
    LoRA for the base once it is loaded, into `output_dir/_toy_teachers/<teacher>`, with the same weights as the
    `train` command's toy teachers; the card names the teacher `toy:1`."""
    from trl_diffusion_opd.scripts.train import build_trainer
    from trl_diffusion_opd.trainer.model_config import DiffusionModelConfig

    prompts = {"a": ["a red circle", "two cats"], "b": ["the word hello"]}
    teachers = {"a": "toy:1", "b": "toy:2"}
    python = DiffusionOPDTrainer("tiny:sd3", teachers, args=_args(tmp_path / "py"), train_dataset=prompts)
    assert (tmp_path / "py" / "_toy_teachers" / "a" / "pytorch_lora_weights.safetensors").is_file()
    command = build_trainer(
        DiffusionOPDScriptArguments(teachers=json.dumps(teachers), prompts=json.dumps(prompts)),
        _args(tmp_path / "cli"),
        DiffusionModelConfig(model_name_or_path="tiny:sd3"),
    )
    ours = {t: python.teacher_bank.weights(t) for t in teachers}
    theirs = {t: command.teacher_bank.weights(t) for t in teachers}
    assert (
        len(ours["a"]) == 16 and ours["a"].keys() == theirs["a"].keys()
    )  # 4 attention projections x 2 blocks x (A, B)
    assert all(torch.equal(ours[t][k], theirs[t][k]) for t in teachers for k in ours[t])
    key = "transformer_blocks.0.attn.to_q.lora_B.weight"
    assert not torch.equal(ours["a"][key], ours["b"][key])
    python.create_model_card()
    card = (tmp_path / "py" / "README.md").read_text()
    assert (
        "| a | `toy:1` | 4.5 | 1.0 | a random LoRA for the base, written by `trl_diffusion_opd.testing.save_toy_lora` |"
        in card
    )
    with pytest.raises(ValueError) as error:
        DiffusionOPDTrainer("tiny:sd3", {"a": "toy:one"}, args=_args(tmp_path / "bad"), train_dataset={"a": ["x"]})
    assert str(error.value) == "Teacher 'a': 'toy:one' must be 'toy:<integer seed>'."
