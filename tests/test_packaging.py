"""The wheel: built without warnings, it carries every world asset, and the demo's entry point works from an
installation outside the source tree (offline: no build isolation, no index)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "trl_diffusion_opd" / "world" / "assets"

# Run from a folder outside the source tree, with only the installed copy on PYTHONPATH.
PROBE = """
import json, sys
import trl_diffusion_opd
from trl_diffusion_opd.world.demo import shipped_teachers
from trl_diffusion_opd.world.pipeline import BASE_DIR, load_world_pipeline

pipe = load_world_pipeline()
teachers = shipped_teachers()
pipe.load_lora_weights(teachers["letters"], adapter_name="letters")
image = pipe("the letter K", height=32, width=32, num_inference_steps=2, max_sequence_length=1).images[0]
print(json.dumps({
    "package": trl_diffusion_opd.__file__,
    "base": str(BASE_DIR),
    "teachers": sorted(teachers),
    "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
    "size": list(image.size),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")  # built in this environment: no build isolation, nothing downloaded
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    shutil.copytree(
        ROOT / "trl_diffusion_opd", source / "trl_diffusion_opd", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--wheel-dir", str(folder), "--verbose"],
        capture_output=True,
        text=True,
        cwd=folder,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = folder.glob("trl_diffusion_opd-*.whl")
    return path, build.stdout + build.stderr


def test_wheel_builds_without_warnings_and_carries_every_asset(wheel):
    path, log = wheel
    assert "would be ignored" not in log and "Warning" not in log, log[-3000:]
    names = set(zipfile.ZipFile(path).namelist())
    assets = {str(p.relative_to(ROOT)) for p in ASSETS.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert len(assets) >= 25  # the base pipeline's 16 files, the index and 3 x 4 teacher files
    assert assets <= names, sorted(assets - names)
    assert "trl_diffusion_opd/templates/model_card.md" in names
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers: about a minute on a loaded 2-core CPU
def test_installed_wheel_loads_the_world_outside_the_source_tree(wheel, tmp_path):
    path, _ = wheel
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(path)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["package"].startswith(str(target)), report  # the installed copy, not the source tree
    assert report["base"].startswith(str(target)), report
    assert report["teachers"] == ["aesthetic", "composition", "letters"]
    assert report["parameters"] > 3_000_000  # the pretrained 3.5M-parameter world transformer
    assert report["size"] == [32, 32]
