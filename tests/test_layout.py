"""The package's layout: imports run one way, from the commands down to the math, and the demo world is a plug-in
that the rest of the package never imports (deleting it leaves a working package)."""

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import trl_diffusion_opd
from trl_diffusion_opd import registry


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(trl_diffusion_opd.__file__).parent
NAME = "trl_diffusion_opd"

# Layers from the bottom up; a module may import only modules of its own layer or of lower layers.
# Plug-ins (`world`, `testing`) sit on top: they use the public API and nothing but the toy adapters of the
# commands (`scripts.utils`, loaded when a `toy:` spec is asked for) imports them.
LAYERS = [
    {"transition", "objectives", "registry", "safe_io", "lora_io", "sizes", "accelerate_configs", "figures"},
    {"families", "data", "rewards", "teachers", "teacher_bank", "hub", "evaluation", "merging"},
    {"trainer", NAME},
    {"scripts", "cli"},
    {"testing", "world"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Package modules imported anywhere in `path` (function-level imports included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(NAME)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(NAME):
                continue
            # `from . import registry` imports a module; `from .. import DiffusionOPDConfig` the package.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    found.discard(module)
    return found


def _exists(module: str) -> bool:
    path = PACKAGE.parent / module.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else NAME
    return next(index for index, layer in enumerate(LAYERS) if top in layer)


def test_every_module_has_a_layer_and_imports_only_downwards():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module) and not (module == f"{NAME}.scripts.utils" and target == f"{NAME}.testing")
    ]
    assert upward == []


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module, stack):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_core_never_imports_the_world():
    importers = sorted(
        module
        for module, targets in _graph().items()
        if not module.startswith(f"{NAME}.world") and any(t.startswith(f"{NAME}.world") for t in targets)
    )
    assert importers == []


def test_trainers_live_in_trainer_beside_their_configs():
    trainer = PACKAGE / "trainer"
    for method in ("base", "rl", "opd", "grpo", "nft"):
        assert (trainer / f"{method}_trainer.py").is_file() and (trainer / f"{method}_config.py").is_file()
    commands = {path.stem for path in (PACKAGE / "scripts").glob("*.py")} - {"__init__", "utils", "launch"}
    assert commands == {"train", "grpo", "nft", "eval", "merge", "env"}


def test_world_names_come_from_the_plugin_registry():
    assert {"tiny:sd3", "tiny:flux", "world:base"} <= set(registry.pipeline_names())
    assert "world" in registry.commands()
    assert registry.load_named_prompts("world:letters:heldout")[0]["task"] == "letters"
    assert registry.load_named_prompts("unknown:x") is None
    with pytest.raises(ValueError, match="not a registered pipeline name"):
        registry.load_pipeline("nothing:here")


def test_a_user_registers_their_own_names(tmp_path):
    from trl_diffusion_opd.data import load_prompt_source
    from trl_diffusion_opd.teachers import parse_teacher_spec

    (tmp_path / "ocr").mkdir()
    registry.register_prompt_source("mylab", lambda name: [{"prompt": name.upper()}])
    registry.register_teacher("mylab", lambda name: tmp_path / name.split(":", 1)[1])
    assert load_prompt_source("mylab:cats") == [{"prompt": "MYLAB:CATS"}]
    spec = parse_teacher_spec("ocr", "mylab:ocr")
    assert (spec.path, spec.display) == (str(tmp_path / "ocr"), "mylab:ocr")
    with pytest.raises(ValueError, match="A scheme is a word"):
        registry.register_teacher("my lab", str)


def test_the_package_works_without_the_world(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / NAME, ignore=shutil.ignore_patterns("world", "__pycache__"))
    script = f"""
import {NAME}, sys
assert {NAME}.__file__.startswith({str(copy)!r}), {NAME}.__file__
from {NAME} import cli, registry
from {NAME}.rewards import get_reward
assert "world:base" not in registry.pipeline_names() and "tiny:sd3" in registry.pipeline_names()
assert get_reward("brightness").name == "brightness"
sys.exit(cli.main(["train", "--config", {str(ROOT / "examples/configs/tiny.yaml")!r}, "--max_steps", "1",
                   "--output_dir", {str(tmp_path / "run")!r}, "--report_to", "none"]))
"""
    # `-S` skips the `.pth` files, so an editable install's import hook cannot bring the world back from the source
    # tree; site-packages stays on the path for the dependencies and the entry points.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), sysconfig.get_paths()["purelib"]])}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plug-in 'world' failed to load" in result.stderr
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
