"""The model card as a Hub visitor reads it: links only to pages that exist, no path of the training machine, a quick
start that runs, the results the run measured, and metadata the Hub accepts."""

import configparser
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub import constants as hub_constants

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer, hub, rewards
from trl_diffusion_opd.evaluation import evaluate_models
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_to_hub_cache, save_toy_lora

from helpers import quick_start as _quick_start


ROOT = Path(__file__).resolve().parent.parent
PROMPTS = {"geneval": ["a red circle", "two cats"], "ocr": ['a sign that says "hi"', "the word cat"]}
HELD_OUT = {"geneval": ["a blue square", "one dog"], "ocr": ["the word dog", 'a sign that says "no"']}
# Pages a card may link to besides its base's and teachers' Hub pages (and their sub-pages).
ALLOWED_LINKS = (
    "https://arxiv.org/abs/2605.15055",
    "https://github.com/huggingface/trl",
    "https://github.com/huggingface/diffusers",
    "https://github.com/huggingface/peft",
    "https://huggingface.co/docs/trl",
    "https://huggingface.co/docs/diffusers",
    "https://huggingface.co/docs/peft",
)
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}  # the tiny base is saved without T5
_URL = re.compile(r"https?://[^\s)\]>\"'`}]+")


def _urls(text: str) -> list[str]:
    return [url.rstrip(".,;") for url in _URL.findall(text)]


def _disallowed(urls: list[str], hub_repos: list[str]) -> list[str]:
    allowed = ALLOWED_LINKS + tuple(f"https://huggingface.co/{repo}" for repo in hub_repos)
    return [url for url in urls if not any(url == page or url.startswith(page + "/") for page in allowed)]


def _args(output_dir, **kwargs) -> DiffusionOPDConfig:
    defaults = {
        "output_dir": str(output_dir),
        "max_steps": 1,
        "resolution": 32,
        "num_inference_steps": 3,
        "per_device_train_batch_size": 2,
        "max_sequence_length": 1,
        "report_to": "none",
        "learning_rate": 1e-2,
        "ema": False,
        "save_strategy": "no",
        "use_cpu": True,
    }
    return DiffusionOPDConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def offline():
    """No Hub: a `huggingface_hub` call reads an empty cache and fails fast instead of reaching for the network."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        hub.base_license.cache_clear()
        yield monkeypatch
    hub.base_license.cache_clear()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, offline):
    """A run on a base saved into a temporary folder and loaded back from it, with a local teacher folder, a teacher
    in a Hub-cache folder (`models--org--ocr-teacher/snapshots/<commit>`) passed by its path, a student continued
    from a local adapter, rewards evaluated during training (`eval_rewards`), `evaluate()`'s KL and an external
    results table (`evaluate_models`: base vs teacher vs student)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("local-run")
    get_tiny_sd3_pipeline(seed=0, with_t5=False).save_pretrained(tmp / "my-base")
    pipe = DiffusionPipeline.from_pretrained(str(tmp / "my-base"), **NO_T5)
    assert pipe.name_or_path == str(tmp / "my-base")  # what the trainer sees: the machine's absolute path
    save_toy_lora(pipe, tmp / "teachers" / "geneval", seed=1, std=0.3)
    save_toy_lora(pipe, tmp / "downloaded", seed=2, std=0.3)
    snapshot = save_to_hub_cache(tmp / "downloaded", "org/ocr-teacher", tmp / "hub-cache")
    save_toy_lora(pipe, tmp / "warm-start", seed=3, std=0.05)
    output_dir = tmp / "out"
    args = _args(
        output_dir,
        max_steps=2,
        eval_rewards="brightness",
        eval_steps=1,
        student_adapter=str(tmp / "warm-start"),
    )
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": str(tmp / "teachers" / "geneval"), "ocr": str(snapshot)},
        args=args,
        train_dataset=PROMPTS,
        eval_dataset=HELD_OUT,
    )
    trainer.train()
    kl = trainer.evaluate()
    trainer.save_model()
    eval_pipe = DiffusionPipeline.from_pretrained(str(tmp / "my-base"), **NO_T5)
    eval_pipe.set_progress_bar_config(disable=True)
    table = evaluate_models(
        eval_pipe,
        {"brightness": HELD_OUT["geneval"]},
        adapters={"teacher: geneval": str(tmp / "teachers" / "geneval"), "student": str(output_dir)},
        num_inference_steps=3,
        resolution=32,
        seed=7,
        max_sequence_length=1,
        progress=False,
    )
    trainer.create_model_card(results=table)
    yield {
        "tmp": tmp,
        "trainer": trainer,
        "kl": kl,
        "table": table,
        "commit": snapshot.name,
        "card": (output_dir / "README.md").read_text(),
    }
    rewards.clear_reward_cache()


def test_local_run_card_has_no_path_of_the_machine(local_run):
    card, tmp = local_run["card"], local_run["tmp"]
    assert str(tmp) not in card and str(tmp.resolve()) not in card
    assert "pytest-of-" not in card and str(Path.home()) + "/" not in card
    data = ModelCard(card).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data  # a local base has no Hub id


def test_local_run_card_names_local_models_as_a_reader_can_use_them(local_run):
    card, commit = local_run["card"], local_run["commit"]
    assert "This is a LoRA adapter for `my-base`," in card
    assert "The base, `my-base`, is a local folder, not on the Hub." in card
    assert "| geneval | `geneval` | 4.5 | 1.0 | a local folder, not on the Hub |" in card
    assert (
        f"| ocr | `org/ocr-teacher@{commit}` | 4.5 | 1.0 | [Hub](https://huggingface.co/org/ocr-teacher); "
        "loaded from a local copy of the Hub repo |"
    ) in card
    assert "| continued from | `warm-start` (a local folder, not on the Hub) |" in card
    code = _quick_start(card)
    compile(code, "quick_start", "exec")
    assert "# The base was a local folder ('my-base'), not on the Hub: point this at your copy of it." in code
    assert 'DiffusionPipeline.from_pretrained("my-base", torch_dtype=torch.bfloat16)' in code
    assert 'pipe.load_lora_weights("out")' in code


def test_local_run_card_reports_rewards_during_training(local_run):
    card, trainer = local_run["card"], local_run["trainer"]
    evaluations = [e for e in trainer.state.log_history if "rewards/geneval/brightness" in e]
    assert [e["step"] for e in evaluations] == [1, 2]
    section = card.split("### Rewards during training", 1)[1].split("###", 1)[0]
    assert "| task | reward | step 1 | step 2 |" in section
    for task in ("geneval", "ocr"):
        first, last = (e[f"rewards/{task}/brightness"] for e in evaluations)
        assert f"| {task} | brightness | {first:.4f} | {last:.4f} |" in section
    assert "(geneval: 2 held-out, ocr: 2 held-out prompts per task, one image each)" in section
    assert "guidance 4.5 and the same initial noise (seed 0)" in section
    assert "3 steps" in section and "2 evaluations, the first and the last shown." in section


def test_local_run_card_reports_evaluate_kl(local_run):
    card, kl = local_run["card"], local_run["kl"]
    section = card.split("### KL to the teachers", 1)[1].split("##", 1)[0]
    assert f"| geneval | {kl['eval_kl/geneval']:.4f} |" in section
    assert f"| ocr | {kl['eval_kl/ocr']:.4f} |" in section
    assert f"| mean over tasks | {kl['eval_kl']:.4f} |" in section
    assert kl["eval_kl/geneval"] > 0 and kl["eval_kl/ocr"] > 0
    assert "(reference normalisation)" in section and "held-out prompts (geneval: 2, ocr: 2)" in section
    assert "3 sampler steps, seed 0; measured by `trainer.evaluate()` at step 2" in section


def test_local_run_card_carries_the_external_results_table(local_run):
    card, table = local_run["card"], local_run["table"]
    section = card.split("### Evaluation", 1)[1].split("###", 1)[0]
    scores = {label: table.scores[label]["brightness"] for label in ("base", "teacher: geneval", "student")}
    average = table.average
    assert "| model | adapter | brightness | Average |" in section
    assert f"| base | – (the base) | {scores['base']:.4f} | {average['base']:.4f} |" in section
    assert f"| teacher: geneval | `geneval` | {scores['teacher: geneval']:.4f} |" in section
    assert f"| student | this adapter | {scores['student']:.4f} | {average['student']:.4f} |" in section
    assert "(brightness: 2 prompts)" in section and "(seed 7 + image index)" in section
    assert "3 Euler ODE steps, guidance 4.5" in section and "32 px" in section
    # Every model of the table was sampled from the same noise, so the rows differ only by the adapters.
    assert len({round(value, 6) for value in scores.values()}) == 3


def test_local_run_card_shows_samples_as_widgets(local_run):
    card = local_run["card"]
    data = ModelCard(card).data.to_dict()
    assert data["widget"] == [
        {
            "text": 'geneval: a blue square | one dog · ocr: the word dog | a sign that says "no"',
            "output": {"url": "samples/step-000002.png"},
        }
    ]
    assert (local_run["tmp"] / "out" / "samples" / "step-000002.png").is_file()
    assert "](samples/step-000002.png)" in card


def test_local_run_card_links_only_to_allowed_pages(local_run):
    urls = _urls(local_run["card"])
    assert "https://huggingface.co/org/ocr-teacher" in urls and "https://arxiv.org/abs/2605.15055" in urls
    assert _disallowed(urls, ["org/ocr-teacher"]) == []


def test_package_metadata_links_only_to_allowed_pages():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    metadata = config["metadata"]
    urls = _urls(metadata.get("url", "")) + _urls(metadata.get("project_urls", ""))
    assert _disallowed(urls, []) == []
    template = (ROOT / "trl_diffusion_opd" / "templates" / "model_card.md").read_text()
    assert "github.com/huggingface/trl-diffusion-opd" not in template + metadata.get("url", "")


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory, offline):
    """A run on the Hub base `org/tiny-sd3` with a Hub teacher resolved from the (offline) cache."""
    tmp = tmp_path_factory.mktemp("hub-run")
    cache = tmp / "hub-cache"
    offline.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    pipe = get_tiny_sd3_pipeline(seed=0, with_t5=False)
    pipe.register_to_config(_name_or_path="org/tiny-sd3")
    save_toy_lora(pipe, tmp / "teacher", seed=1, std=0.3)
    snapshot = save_to_hub_cache(tmp / "teacher", "org/geneval-teacher", cache)
    trainer = DiffusionOPDTrainer(
        pipe, {"geneval": "org/geneval-teacher"}, args=_args(tmp / "out"), train_dataset={"geneval": ["a red circle"]}
    )
    trainer.create_model_card(tags="extra-tag")
    return {"card": (tmp / "out" / "README.md").read_text(), "commit": snapshot.name, "tmp": tmp, "trainer": trainer}


def test_hub_run_card_metadata_validates_without_warnings(hub_run):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            card = ModelCard(hub_run["card"], ignore_metadata_errors=False)
            rebuilt = ModelCardData(**card.data.to_dict())
    finally:
        hub_logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    header = yaml.safe_load(hub_run["card"].split("---\n", 2)[1])
    assert header == card.data.to_dict() == rebuilt.to_dict()
    assert header["base_model"] == "org/tiny-sd3"
    assert header["base_model_relation"] == "adapter"
    assert header["library_name"] == "diffusers"
    assert header["pipeline_tag"] == "text-to-image"
    assert header["tags"] == [
        "trl",
        "diffusion-opd",
        "diffusers",
        "lora",
        "text-to-image",
        "sd3.5",
        "geneval",
        "extra-tag",
    ]
    assert "widget" not in header  # nothing was sampled


def test_hub_run_card_links_the_hub_pages_and_nothing_invented(hub_run):
    card, commit = hub_run["card"], hub_run["commit"]
    assert "This is a LoRA adapter for [`org/tiny-sd3`](https://huggingface.co/org/tiny-sd3)," in card
    assert "The base, " not in card  # nothing to say about a Hub base
    assert (
        f"| geneval | `org/geneval-teacher@{commit}` | 4.5 | 1.0 | [Hub](https://huggingface.co/org/geneval-teacher) |"
        in card
    )
    assert 'DiffusionPipeline.from_pretrained("org/tiny-sd3", torch_dtype=torch.bfloat16)' in _quick_start(card)
    assert "## Results" not in card  # nothing was measured
    urls = _urls(card)
    assert _disallowed(urls, ["org/tiny-sd3", "org/geneval-teacher"]) == []
    assert "https://github.com/huggingface/trl" in urls and "https://github.com/huggingface/diffusers" in urls
    assert str(hub_run["tmp"]) not in card


def test_base_in_a_hub_cache_folder_is_named_by_its_hub_id(hub_run):
    """A base loaded from its Hub-cache folder by path is the Hub repo it was downloaded from, in metadata and text."""
    trainer = hub_run["trainer"]
    snapshot = save_to_hub_cache(hub_run["tmp"] / "teacher", "owner/cached-base", hub_run["tmp"] / "other-cache")
    trainer.base_model_id = str(snapshot)
    try:
        card = str(hub.create_model_card(trainer))
    finally:
        trainer.base_model_id = "org/tiny-sd3"
    data = ModelCard(card).data.to_dict()
    assert (data["base_model"], data["base_model_relation"]) == ("owner/cached-base", "adapter")
    assert (
        f"This is a LoRA adapter for [`owner/cached-base@{snapshot.name}`](https://huggingface.co/owner/cached-base)"
        in card
    )
    assert 'DiffusionPipeline.from_pretrained("owner/cached-base", torch_dtype=torch.bfloat16)' in card
    assert "is loaded from a local copy of the Hub repo." in card
    assert str(hub_run["tmp"]) not in card


def test_model_reference_names():
    from trl_diffusion_opd.teachers import parse_teacher_spec
    from trl_diffusion_opd.world.pipeline import load_world_pipeline

    # Registered names (`trl_diffusion_opd.registry`) stay names, with their plug-in's description.
    world_base = hub.model_reference(load_world_pipeline().config._name_or_path)
    assert (world_base.name, world_base.kind, world_base.hub_id) == ("world:base", "registered", None)
    assert world_base.note == "the tiny world's base, shipped inside the trl-diffusion-opd package"
    letters = hub.teacher_reference(parse_teacher_spec("letters", "world:letters"))
    assert (letters.name, letters.kind) == ("world:letters", "registered")
    assert letters.note == "a Stage-1 teacher of the tiny world, shipped inside the trl-diffusion-opd package"
    assert hub.model_reference("tiny:flux").note.endswith("`trl_diffusion_opd.testing.get_tiny_flux_pipeline(seed=0)`")
    cached = hub.model_reference(f"/x/hub/models--owner--my-model/snapshots/{'a' * 40}/OCRTeacher/lora")
    assert (cached.name, cached.kind, cached.hub_id) == (
        f"owner/my-model/OCRTeacher/lora@{'a' * 40}",
        "hub-cache",
        "owner/my-model",
    )
    local = hub.model_reference("./runs/teacher-7", subfolder="lora")
    assert (local.name, local.kind, local.url) == ("teacher-7/lora", "local", None)
    assert hub.model_reference("owner/name").markdown() == "[`owner/name`](https://huggingface.co/owner/name)"
    assert hub.model_reference(None).name == "unknown"


def test_quick_start_of_a_tiny_base_runs(tmp_path, offline):
    """The quick start of a `tiny:sd3` run, with the repo id pointed at the local output, samples an image of the
    trained size with the adapter loaded."""
    torch.set_num_threads(1)
    pipe = get_tiny_sd3_pipeline(seed=0)
    pipe.register_to_config(_name_or_path="tiny:sd3")
    save_toy_lora(pipe, tmp_path / "teacher", seed=1, std=0.3)
    trainer = DiffusionOPDTrainer(
        pipe,
        {"geneval": str(tmp_path / "teacher")},
        args=_args(tmp_path / "out"),
        train_dataset={"geneval": ["a cat"]},
    )
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "The base, `tiny:sd3`, is randomly initialised, built by" in card
    code = _quick_start(card)
    assert "from trl_diffusion_opd.testing import get_tiny_sd3_pipeline" in code
    assert 'pipe.load_lora_weights("out")' in code
    namespace = {}
    exec(code.replace('load_lora_weights("out")', f'load_lora_weights("{tmp_path / "out"}")'), namespace)
    assert namespace["image"].size == (32, 32)
    assert namespace["pipe"].get_list_adapters() == {"transformer": ["default_0"]}


def test_card_of_a_pipeline_built_in_memory_says_how_and_its_quick_start_runs(tmp_path, offline, monkeypatch):
    """A base passed as a pipeline object with no `name_or_path` is named by its class and how it was built (never
    `unknown`); the quick start loads the adapter by the Hub id once there is one, else by the output folder as it
    was given (relative to the folder training ran in), and runs from there."""
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    teacher = save_toy_lora(get_tiny_sd3_pipeline(seed=0), tmp_path / "teacher", seed=1, std=0.3)
    built = get_tiny_sd3_pipeline(seed=1, with_t5=False)
    trainer = DiffusionOPDTrainer(
        built, {"geneval": str(teacher)}, args=_args("runs/out"), train_dataset={"geneval": ["a cat"]}
    )
    trainer.save_model()
    card = (tmp_path / "runs" / "out" / "README.md").read_text()
    call = "get_tiny_sd3_pipeline(seed=1, with_t5=False)"
    assert "This is a LoRA adapter for `StableDiffusion3Pipeline`," in card
    assert (
        f"The base, `StableDiffusion3Pipeline`, is randomly initialised, built by `trl_diffusion_opd.testing.{call}`."
        in card
    )
    assert "unknown" not in card and str(tmp_path) not in card
    code = _quick_start(card)
    assert f"pipe = {call}\n" in code
    assert (
        "# Not pushed to the Hub: the folder of this card, relative to the folder training ran in.\n"
        'pipe.load_lora_weights("runs/out")\n'
    ) in code
    namespace = {}
    exec(code, namespace)  # as written, from the folder training ran in
    assert namespace["image"].size == (32, 32)
    assert namespace["pipe"].get_list_adapters() == {"transformer": ["default_0"]}

    # The default tiny pipeline is `tiny:sd3`, as `load_pipeline("tiny:sd3")` names it.
    assert get_tiny_sd3_pipeline(seed=0).name_or_path == "tiny:sd3" and built.name_or_path is None

    # A pipeline assembled by hand records nothing: its class, and a quick start that says what to fill in.
    bare = StableDiffusion3Pipeline(**get_tiny_sd3_pipeline(seed=0).components)
    trainer = DiffusionOPDTrainer(
        bare,
        {"geneval": str(teacher)},
        args=_args(tmp_path / "bare", hub_model_id="org/my-adapter"),
        train_dataset={"geneval": ["a cat"]},
    )
    trainer.create_model_card()
    card = (tmp_path / "bare" / "README.md").read_text()
    assert (
        "The base, `StableDiffusion3Pipeline`, is a pipeline built in memory; no Hub id or folder was recorded."
        in card
    )
    code = _quick_start(card)
    compile(code, "quick_start", "exec")
    assert "unknown" not in card and "Not pushed" not in code
    assert (
        "# The base was a StableDiffusion3Pipeline built in memory, with no Hub id or folder recorded: load the same "
        "weights.\n"
        'pipe = StableDiffusion3Pipeline.from_pretrained("<the base model>", torch_dtype=torch.bfloat16).to(device)\n'
        'pipe.load_lora_weights("org/my-adapter")\n'
    ) in code
