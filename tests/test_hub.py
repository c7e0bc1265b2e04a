"""Hub round trip: teachers resolved from a local Hub cache offline, the model card, and `push_to_hub` with the
Hub's API intercepted (no network)."""

import logging
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, ModelCard, RepoUrl
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_api as hf_api_module
from PIL import Image
from safetensors.torch import load_file
from transformers.trainer_utils import HubStrategy

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer, hub, teachers
from trl_diffusion_opd.lora_io import read_lora_folder
from trl_diffusion_opd.teachers import parse_teacher_spec, resolve_teacher
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_to_hub_cache, save_toy_lora


PROMPTS = {"geneval": ["a red circle", "two cats"], "ocr": ['a sign that says "hi"', "the word cat"]}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache with the Hub offline, as `HF_HUB_OFFLINE=1 HF_HUB_CACHE=...` would set it at start-up."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    hub.base_license.cache_clear()
    yield cache
    hub.base_license.cache_clear()


def _tiny_args(output_dir, **kwargs) -> DiffusionOPDConfig:
    defaults = {
        "output_dir": str(output_dir),
        "max_steps": 1,
        "resolution": 32,
        "num_inference_steps": 4,
        "per_device_train_batch_size": 2,
        "max_sequence_length": 1,
        "report_to": "none",
        "learning_rate": 1e-2,
        "ema": False,
        "save_strategy": "no",
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


@pytest.fixture
def hub_teachers(tmp_path, offline_cache):
    """Two teacher repos in the cache: `org/geneval-teacher` (diffusers format at the root) and
    `org/DiffusionOPD` (PEFT format in `OCRTeacher/lora`, diffusers format in `AesTeacher/lora`)."""
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    single = save_toy_lora(pipe, tmp_path / "single", seed=1, std=0.3)
    multi = tmp_path / "multi"
    save_toy_lora(pipe, multi / "OCRTeacher" / "lora", seed=2, std=0.3, format="peft")
    save_toy_lora(pipe, multi / "AesTeacher" / "lora", seed=3, std=0.3)
    save_to_hub_cache(single, "org/geneval-teacher", offline_cache)
    save_to_hub_cache(multi, "org/DiffusionOPD", offline_cache)
    save_to_hub_cache(single, "org/DiffusionOPD-v1", offline_cache, revision="v1")
    return {"single": single, "multi": multi}


def test_teacher_resolves_repo_id_offline_in_diffusers_format(hub_teachers, offline_cache):
    spec = parse_teacher_spec("geneval", "org/geneval-teacher")
    folder = resolve_teacher(spec)
    assert folder.parent.name == "snapshots" and folder.parents[1].name == "models--org--geneval-teacher"
    state, config = read_lora_folder(folder)
    expected, _ = read_lora_folder(hub_teachers["single"])
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert config["r"] == 4


def test_teacher_resolves_subfolder_offline_in_peft_format(hub_teachers, offline_cache):
    spec = parse_teacher_spec("ocr", "org/DiffusionOPD/OCRTeacher/lora")
    assert (spec.path, spec.subfolder, spec.revision) == ("org/DiffusionOPD", "OCRTeacher/lora", None)
    folder = resolve_teacher(spec)
    assert folder.parts[-2:] == ("OCRTeacher", "lora")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    state, config = read_lora_folder(folder)
    expected, _ = read_lora_folder(hub_teachers["multi"] / "OCRTeacher" / "lora")
    assert all(torch.equal(state[k], expected[k]) for k in expected) and state.keys() == expected.keys()
    assert config["peft_type"] == "LORA"


@pytest.mark.parametrize("adapter_format", ["diffusers", "peft"])
@pytest.mark.parametrize("where", ["root", "subfolder"])
def test_teacher_resolves_in_both_formats_at_root_and_in_subfolder(tmp_path, offline_cache, adapter_format, where):
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    repo = tmp_path / "repo"
    folder = repo if where == "root" else repo / "Teacher" / "lora"
    save_toy_lora(pipe, folder, seed=5, std=0.3, format=adapter_format)
    save_to_hub_cache(repo, "org/teacher", offline_cache)
    spec = parse_teacher_spec("task", "org/teacher" if where == "root" else "org/teacher/Teacher/lora")
    state, _ = read_lora_folder(resolve_teacher(spec))
    expected, _ = read_lora_folder(folder)
    assert state.keys() == expected.keys() and len(state) > 0
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_teacher_resolves_revision_and_cache_dir_argument(hub_teachers, offline_cache, monkeypatch):
    # An explicit cache_dir wins over HF_HUB_CACHE.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", "/nonexistent-cache")
    spec = parse_teacher_spec("geneval", "org/DiffusionOPD-v1@v1")
    assert spec.revision == "v1"
    folder = resolve_teacher(spec, cache_dir=str(offline_cache))
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    unknown_revision = parse_teacher_spec("geneval", "org/DiffusionOPD-v1@v2")
    with pytest.raises(ValueError, match="org/DiffusionOPD-v1@v2"):
        resolve_teacher(unknown_revision, cache_dir=str(offline_cache))


def test_teacher_is_resolved_once_and_downloads_only_adapter_files(hub_teachers, offline_cache, monkeypatch):
    calls = []
    real = teachers.snapshot_download

    def counting(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(teachers, "snapshot_download", counting)
    spec = parse_teacher_spec("aes", "org/DiffusionOPD/AesTeacher/lora")
    first = resolve_teacher(spec, token="hf_test")
    assert resolve_teacher(spec) == first
    assert len(calls) == 1
    repo_id, kwargs = calls[0]
    assert repo_id == "org/DiffusionOPD" and kwargs["token"] == "hf_test"
    assert kwargs["allow_patterns"] == [
        "AesTeacher/lora/pytorch_lora_weights.safetensors",
        "AesTeacher/lora/adapter_model.safetensors",
        "AesTeacher/lora/*.json",
    ]


def test_unknown_teacher_names_teacher_and_offline_state(offline_cache):
    spec = parse_teacher_spec("ocr", "org/not-in-cache/OCRTeacher/lora")
    with pytest.raises(ValueError) as error:
        resolve_teacher(spec)
    message = str(error.value)
    assert "Teacher 'ocr'" in message and "org/not-in-cache/OCRTeacher/lora" in message
    assert "HF_HUB_OFFLINE=1" in message and "offline" in message


def test_missing_subfolder_names_teacher_and_offline_state(hub_teachers, offline_cache):
    spec = parse_teacher_spec("ocr", "org/DiffusionOPD/NoSuchTeacher/lora")
    with pytest.raises(ValueError, match=r"Teacher 'ocr'.*NoSuchTeacher/lora.*HF_HUB_OFFLINE=1"):
        resolve_teacher(spec)


def test_full_weight_teacher_is_recognised_and_downloaded(tmp_path, offline_cache):
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    pipe.transformer.save_pretrained(tmp_path / "full" / "transformer")
    save_to_hub_cache(tmp_path / "full", "org/full-teacher", offline_cache)
    spec = parse_teacher_spec("aes", "org/full-teacher")
    folder = resolve_teacher(spec)
    assert spec.full_weight
    assert (folder / "transformer" / "config.json").is_file()
    assert list((folder / "transformer").glob("*.safetensors"))
    local = parse_teacher_spec("aes", str(tmp_path / "full" / "transformer"))
    resolve_teacher(local)
    assert local.full_weight


def test_trainer_loads_hub_teachers_in_both_formats(hub_teachers, offline_cache, tmp_path):
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": "org/geneval-teacher", "ocr": "org/DiffusionOPD/OCRTeacher/lora"},
        args=_tiny_args(tmp_path / "out"),
        train_dataset=PROMPTS,
    )
    for task, source in (("geneval", hub_teachers["single"]), ("ocr", hub_teachers["multi"] / "OCRTeacher/lora")):
        expected, _ = read_lora_folder(source)
        loaded = trainer.teacher_bank.weights(task)
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
        assert not any(p.requires_grad for p in loaded.values())
    spec = trainer.teacher_specs["ocr"][0]
    assert hub.teacher_reference(spec).name.startswith("org/DiffusionOPD/OCRTeacher/lora@")
    assert len(hub.teacher_reference(spec).name.split("@")[1]) == 40  # the resolved commit, for reproducibility


def test_known_base_license():
    assert hub.base_license("stabilityai/stable-diffusion-3.5-medium") == {
        "license": "other",
        "license_name": "stabilityai-ai-community",
        "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md",
    }
    assert hub.base_license("black-forest-labs/FLUX.1-schnell") == {"license": "apache-2.0"}
    # FLUX.2 [klein]: the 4B models are Apache-2.0, the 9B ones (base and distilled) BFL's non-commercial licence.
    assert hub.base_license("black-forest-labs/FLUX.2-klein-base-4B") == {"license": "apache-2.0"}
    assert hub.base_license("black-forest-labs/FLUX.2-klein-base-9B") == {
        "license": "other",
        "license_name": "flux-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.2-klein-base-9B/blob/main/LICENSE.md",
    }


class _FakeHub:
    """Stands in for the Hub's HTTP API: records repos created and commits made."""

    def __init__(self):
        self.repos, self.commits, self.validated_cards = [], [], []

    def create_repo(self, api, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append({"repo_id": repo_id, "private": private, "token": token})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, commit_message, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": files, **kwargs})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
            commit_message=commit_message,
            commit_description="",
            oid="0" * 40,
        )


def _intercept_hub(monkeypatch) -> _FakeHub:
    fake = _FakeHub()
    monkeypatch.setattr(hf_api_module.HfApi, "create_repo", lambda api, *a, **k: fake.create_repo(api, *a, **k))
    monkeypatch.setattr(hf_api_module.HfApi, "create_commit", lambda api, **k: fake.create_commit(api, **k))
    # upload_folder has the Hub validate a README's metadata before uploading it.
    monkeypatch.setattr(
        hf_api_module.HfApi, "_validate_yaml", lambda api, content, **k: fake.validated_cards.append(content)
    )
    # The xet upload pipeline would talk to the Hub itself; the classic path ends in `create_commit`.
    monkeypatch.setattr(hf_api_module, "is_xet_available", lambda: False)
    return fake


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A trainer on `org/tiny-sd3` (whose card in the offline cache says MIT) trained 2 rounds with a checkpoint
    each round, an output folder holding files that must not be pushed, then `push_to_hub()` against an
    intercepted Hub API (kept intercepted for the module's tests)."""
    tmp_path = tmp_path_factory.mktemp("push")
    cache = tmp_path / "hub-cache"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
        hub.base_license.cache_clear()
        fake_hub = _intercept_hub(monkeypatch)
        base_card = tmp_path / "base-card"
        base_card.mkdir()
        (base_card / "README.md").write_text("---\nlicense: mit\nlibrary_name: diffusers\n---\n# tiny\n")
        save_to_hub_cache(base_card, "org/tiny-sd3", cache)
        pipe = get_tiny_sd3_pipeline(with_t5=False)
        pipe.register_to_config(_name_or_path="org/tiny-sd3")
        save_toy_lora(pipe, tmp_path / "teachers" / "geneval", seed=1, std=0.3)
        save_toy_lora(pipe, tmp_path / "teachers" / "ocr", seed=2, std=0.3, format="peft")
        output_dir = tmp_path / "out"
        args = _tiny_args(
            output_dir,
            max_steps=2,
            save_strategy="steps",
            save_steps=1,
            push_to_hub=True,
            hub_model_id="me/tiny-opd",
            hub_private_repo=True,
            hub_strategy="end",
            hub_token="hf_write",
            teacher_guidance_scale={"geneval": 1.0, "ocr": 4.5},
        )
        trainer = DiffusionOPDTrainer(
            pipe,
            {"geneval": str(tmp_path / "teachers" / "geneval"), "ocr": str(tmp_path / "teachers" / "ocr")},
            args=args,
            train_dataset=PROMPTS,
        )
        trainer.train()
        (output_dir / "samples").mkdir()
        Image.new("RGB", (32, 32), "red").save(output_dir / "samples" / "a_red_circle.png")
        (output_dir / "samples" / "notes.txt").write_text("not an image")
        save_toy_lora(pipe, output_dir / "teacher_copy", seed=3)  # a teacher that happens to sit in output_dir
        (output_dir / "runs").mkdir()
        (output_dir / "runs" / "events.out").write_text("logs")
        commit = trainer.push_to_hub()
        yield {"trainer": trainer, "output_dir": output_dir, "hub": fake_hub, "commit": commit, "tmp": tmp_path}
    hub.base_license.cache_clear()


def test_push_to_hub_uploads_exactly_adapter_card_and_samples(pushed):
    fake, output_dir = pushed["hub"], pushed["output_dir"]
    assert fake.repos == [{"repo_id": "me/tiny-opd", "private": True, "token": "hf_write"}]
    assert len(fake.commits) == 1
    commit = fake.commits[0]
    assert commit["repo_id"] == "me/tiny-opd" and commit["message"] == "End of training"
    assert commit["token"] == "hf_write"
    assert sorted(commit["files"]) == ["README.md", "pytorch_lora_weights.safetensors", "samples/a_red_circle.png"]
    assert commit["files"]["pytorch_lora_weights.safetensors"] == (
        (output_dir / "pytorch_lora_weights.safetensors").read_bytes()
    )
    assert pushed["commit"].oid == "0" * 40
    assert fake.validated_cards == [(output_dir / "README.md").read_text()]
    # What stayed local: the checkpoints (optimizer state), the teacher, logs and the training arguments.
    assert (output_dir / "checkpoint-2" / "optimizer.pt").is_file()
    assert (output_dir / "training_args.json").is_file()
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") for key in weights)


def test_pushed_card_metadata_parses_back_without_warnings(pushed):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            card = ModelCard.load(pushed["output_dir"] / "README.md")
    finally:
        hub_logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-sd3"
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "text-to-image"
    assert data["license"] == "mit"  # read from the base's own card in the (offline) cache
    assert sorted(data["tags"]) == sorted(
        ["text-to-image", "diffusers", "lora", "trl", "diffusion-opd", "sd3.5", "geneval", "ocr"]
    )
    assert data["widget"] == [{"text": "a red circle", "output": {"url": "samples/a_red_circle.png"}}]


def test_pushed_card_body(pushed):
    text, tmp_path = (pushed["output_dir"] / "README.md").read_text(), pushed["tmp"]
    assert "# tiny-opd" in text
    assert 'DiffusionPipeline.from_pretrained("org/tiny-sd3"' in text
    assert 'pipe.load_lora_weights("me/tiny-opd")' in text
    # Local teachers by their folder names: the machine's paths stay off the card.
    assert "| geneval | `geneval` | 1.0 | 1.0 | a local folder, not on the Hub |" in text
    assert "| ocr | `ocr` | 4.5 | 1.0 | a local folder, not on the Hub |" in text
    assert str(tmp_path) not in text
    for row in (
        "| sampler | ODE (deterministic) |",
        "| sampler steps (trained steps) | 4 (3) |",
        "| noise level | 0.0 |",
        "| student CFG scale | 4.5 |",
        "| KL normalisation | reference |",
        "| LoRA rank / alpha | 32 / 64 |",
        "| rounds (optimizer steps) | 2 |",
    ):
        assert row in text
    assert "- diffusers: " in text and "- trl-diffusion-opd: " in text
    assert "@article{li2026diffusionopd" in text and "@software{vonwerra2020trl" in text
    assert "![a red circle](samples/a_red_circle.png)" in text


def test_card_quick_start_runs_the_trained_setting(pushed):
    """The quick start is valid Python that samples a training prompt at the trained resolution, steps and T5
    length (what the adapter was trained on), on whatever device exists."""
    text = (pushed["output_dir"] / "README.md").read_text()
    code = text.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "quick_start", "exec")
    first_prompt = next(iter(PROMPTS.values()))[0]
    assert f"    {first_prompt!r},\n" in code
    assert "num_inference_steps=4," in code and "guidance_scale=4.5," in code
    assert "height=32," in code and "width=32," in code and "max_sequence_length=1," in code
    assert 'device = "cuda" if torch.cuda.is_available() else "cpu"' in code


def test_card_written_on_every_checkpoint(pushed):
    for step in (1, 2):
        card = (pushed["output_dir"] / f"checkpoint-{step}" / "README.md").read_text()
        assert f"| rounds (optimizer steps) | {step} |" in card


def test_checkpoint_push_follows_hub_strategy(pushed):
    trainer, fake, output_dir = pushed["trainer"], pushed["hub"], pushed["output_dir"]
    fake.commits.clear()
    trainer.args.hub_strategy = HubStrategy.EVERY_SAVE
    hub.push_checkpoint(trainer, output_dir / "checkpoint-1")
    trainer.push_in_progress.wait_until_done()
    assert [sorted(c["files"]) for c in fake.commits] == [
        ["README.md", "pytorch_lora_weights.safetensors", "samples/a_red_circle.png"]
    ]
    # The adapter of checkpoint 1 was pushed, not the final one.
    assert fake.commits[0]["files"]["pytorch_lora_weights.safetensors"] == (
        (output_dir / "checkpoint-1" / "pytorch_lora_weights.safetensors").read_bytes()
    )

    fake.commits.clear()
    trainer.args.hub_strategy = HubStrategy.CHECKPOINT
    hub.push_checkpoint(trainer, output_dir / "checkpoint-2")
    trainer.push_in_progress.wait_until_done()
    checkpoint_commit = next(c for c in fake.commits if c["message"].endswith("checkpoint"))
    assert "last-checkpoint/optimizer.pt" in checkpoint_commit["files"]
    assert "last-checkpoint/pytorch_lora_weights.safetensors" in checkpoint_commit["files"]

    fake.commits.clear()
    trainer.args.hub_strategy = HubStrategy.END
    hub.push_checkpoint(trainer, output_dir / "checkpoint-2")
    assert fake.commits == []


def test_is_hub_id_accepts_paths():
    from pathlib import Path

    from trl_diffusion_opd.hub import is_hub_id

    assert is_hub_id("owner/name")
    assert not is_hub_id(Path("owner/name"))  # a Path is a local folder, never a repo id (and must not crash)
    assert not is_hub_id("./relative/folder/deeper")
