"""Each config field is documented once, by its `help`: every field that a public config class declares has a help of
at least a sentence, the class docstrings do not list the fields again, and the docs' tables and `--help` print that
same text."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from trl_diffusion_opd import (
    DiffusionModelConfig,
    DiffusionNFTConfig,
    DiffusionOPDConfig,
    DiffusionRLConfig,
    DiffusionTrainingConfig,
    FlowGRPOConfig,
)
from trl_diffusion_opd.scripts import train as train_script
from trl_diffusion_opd.scripts.eval import DiffusionOPDEvalArguments
from trl_diffusion_opd.scripts.merge import DiffusionOPDMergeArguments
from trl_diffusion_opd.scripts.train import DiffusionOPDScriptArguments
from trl_diffusion_opd.scripts.utils import DiffusionRLScriptArguments


ROOT = Path(__file__).resolve().parent.parent
PUBLIC_CONFIGS = [
    DiffusionTrainingConfig,
    DiffusionRLConfig,
    DiffusionOPDConfig,
    FlowGRPOConfig,
    DiffusionNFTConfig,
    DiffusionModelConfig,
    DiffusionOPDScriptArguments,
    DiffusionRLScriptArguments,
    DiffusionOPDEvalArguments,
    DiffusionOPDMergeArguments,
]


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOKS = _hooks()
DECLARED = [(cls, f) for cls in PUBLIC_CONFIGS for f in HOOKS.declared_fields(cls)]


def test_the_public_configs_declare_fields():
    # Guards the parametrisation below against an empty list (e.g. a `declared_fields` that finds nothing).
    assert {cls.__name__: len(HOOKS.declared_fields(cls)) for cls in (DiffusionOPDConfig, DiffusionModelConfig)} == {
        "DiffusionOPDConfig": 22,
        "DiffusionModelConfig": 9,
    }
    assert len(DECLARED) > 80


@pytest.mark.parametrize("cls, f", DECLARED, ids=[f"{cls.__name__}.{f.name}" for cls, f in DECLARED])
def test_every_declared_field_has_a_sentence_of_help(cls, f):
    """A sentence: at least 20 characters and four words, ending with a period (not "Loss." or "KL
    normalisation.")."""
    text = f.metadata.get("help")
    assert isinstance(text, str), f"{cls.__name__}.{f.name} has no help"
    assert len(text) >= 20 and len(text.split()) >= 4 and text.rstrip().endswith("."), text
    assert "%" not in text.replace("%%", ""), "argparse formats help with %: write %% or avoid it"


@pytest.mark.parametrize("cls", PUBLIC_CONFIGS, ids=lambda cls: cls.__name__)
def test_class_docstrings_do_not_document_fields_again(cls):
    """The TRL docstring form `name (`type`, *optional*, ...)` would be a second copy of a field's documentation."""
    doc = cls.__doc__ or ""
    repeated = [f.name for f in HOOKS.declared_fields(cls) if re.search(rf"^\s*{f.name}\b[^\n]*\(`", doc, re.M)]
    assert repeated == []
    assert "Parameters:" not in doc and "Args:" not in doc


def test_docs_table_renders_each_help():
    table = HOOKS.render_fields("trl_diffusion_opd.trainer.opd_config.DiffusionOPDConfig")
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    assert list(rows) == [f.name for f in HOOKS.declared_fields(DiffusionOPDConfig)]
    help_text = DiffusionOPDConfig.__dataclass_fields__["kl_normalization"].metadata["help"]
    assert help_text in rows["kl_normalization"] and "`'reference'`" in rows["kl_normalization"]
    assert "Choices: `paper`, `reference`." in rows["kl_normalization"]
    # An inherited field appears on the page of the class that declares it, once.
    assert "noise_level" not in rows
    assert "noise_level" in HOOKS.render_fields("trl_diffusion_opd.trainer.base_config.DiffusionTrainingConfig")


def test_help_output_prints_the_same_text():
    # argparse re-wraps the text (also after hyphens): compare without whitespace.
    text = "".join(train_script.make_parser().format_help().split())
    for cls in (DiffusionOPDConfig, DiffusionModelConfig):
        for f in HOOKS.declared_fields(cls):
            assert "".join(f.metadata["help"].split()) in text, f.name


def test_every_config_page_marker_names_a_public_config():
    pages = "\n".join(path.read_text() for path in (ROOT / "docs").rglob("*.md"))
    named = set(HOOKS.MARKER.findall(pages))
    assert {path.rsplit(".", 1)[1] for path in named} == {cls.__name__ for cls in PUBLIC_CONFIGS}
    assert all(dataclasses.is_dataclass(cls) for cls in PUBLIC_CONFIGS)
