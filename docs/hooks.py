"""MkDocs hooks of the documentation site.

`<!-- include: FILE -->` is replaced by that file of the repository (one copy of `CONTRIBUTING.md`). The charts of
`benchmarks/results/` are published as `assets/<name>` (one copy, where the benchmarks write them).
`<!-- config-fields: package.module.ClassName -->` in a page becomes a table of the fields that the class declares
(its own, and the inherited ones whose default it changes), rendered from each field's `metadata["help"]`: the help
string is the one source of a field's documentation, and `--help` prints the same text."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
CHARTS = ("paper_table.png", "world_ablation.png")


# Markers stand on a line of their own (a marker quoted in the text, in backticks, is left alone).
MARKER = re.compile(r"^<!--\s*config-fields:\s*([\w.]+)\s*-->$", re.M)
INCLUDE = re.compile(r"^<!--\s*include:\s*([\w./-]+)\s*-->$", re.M)


def declared_fields(cls) -> list[dataclasses.Field]:
    """The dataclass fields that `cls` itself declares (new fields and overridden defaults), in declaration order."""
    own = inspect.get_annotations(cls)
    return [f for f in dataclasses.fields(cls) if f.name in own]


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    return "required"


def _type(f: dataclasses.Field) -> str:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    # A "|" inside a code span of a table cell would show its escaping backslash.
    return " or ".join(f"`{part.strip()}`" for part in text.split("|"))


def _cell(text: str) -> str:
    """`text` on one line for a table cell: outside code spans, `[`, `]`, `*` and `<` are literal (help strings are
    plain text, where `[@revision]` or `<label>` are not markdown links or HTML)."""
    parts = " ".join(text.split()).split("`")
    for index in range(0, len(parts), 2):
        for char, escaped in (("[", "\\["), ("]", "\\]"), ("*", "\\*"), ("<", "&lt;")):
            parts[index] = parts[index].replace(char, escaped)
    return "`".join(parts).replace("|", "\\|")


def render_fields(path: str) -> str:
    """The markdown table of the fields declared by the class at `path` (`package.module.ClassName`)."""
    if str(ROOT) not in sys.path:  # the checkout's classes, also when another copy of the package is installed
        sys.path.insert(0, str(ROOT))
    # A program, as the CLI: other libraries' import-time notes (bitsandbytes, transformers) are dropped.
    importlib.import_module("trl_diffusion_opd.scripts").quiet_library_logs()
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for f in declared_fields(cls):
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text += " Choices: " + ", ".join(f"`{choice}`" for choice in choices) + "."
        rows.append(f"| `{f.name}` | {_cell(_type(f))} | {_cell(_default(f))} | {_cell(help_text)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace every `include` marker of a page with that file of the repository (`CONTRIBUTING.md`), and every
    `config-fields` marker with its table."""
    markdown = INCLUDE.sub(lambda match: (ROOT / match.group(1)).read_text(encoding="utf-8"), markdown)
    return MARKER.sub(lambda match: render_fields(match.group(1)), markdown)


def on_files(files, config, **kwargs):
    """Add the benchmark charts to the site as `assets/<name>`."""
    from mkdocs.structure.files import File  # here: the tests import this module without mkdocs

    for name in CHARTS:
        files.append(
            File.generated(config, f"assets/{name}", abs_src_path=str(ROOT / "benchmarks" / "results" / name))
        )
    return files
