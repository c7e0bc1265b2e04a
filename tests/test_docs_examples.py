"""The Python blocks of the README and the docs that are marked `<!-- test: run -->` run offline on the tiny models:
each page's blocks in order, in one temporary folder (a later block may use what an earlier one wrote)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
MARKED_BLOCK = re.compile(r"^<!-- test: run -->\n```python\n(.*?)^```", re.M | re.S)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = {page: MARKED_BLOCK.findall(page.read_text(encoding="utf-8")) for page in PAGES}
RUNNABLE = {page: blocks for page, blocks in RUNNABLE.items() if blocks}


def test_the_runnable_blocks_are_found():
    # A change of the marker or of the fence would otherwise leave nothing to run, and the test below would pass.
    assert {page.name: len(blocks) for page, blocks in RUNNABLE.items()} == {
        "merging.md": 1,
        "quickstart.md": 2,
        "rewards_evaluation.md": 2,
    }


# Runs the blocks given as files one after the other, each in a fresh namespace, in one process (imports once).
RUNNER = """
import sys, torch
torch.set_num_threads(1)
for path in sys.argv[1:]:
    print(f"=== {path}", flush=True)
    exec(compile(open(path, encoding="utf-8").read(), path, "exec"), {"__name__": "__main__"})
"""


@pytest.mark.parametrize("page", sorted(RUNNABLE), ids=lambda page: page.name)
def test_marked_blocks_run_offline(page, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    blocks = []
    for index, code in enumerate(RUNNABLE[page]):
        blocks.append(tmp_path / f"{page.stem}_{index}.py")
        blocks[-1].write_text(code, encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-c", RUNNER, *map(str, blocks)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, f"{page.name}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    outputs = [part.strip().splitlines() for part in run.stdout.split("=== ")[1:]]
    assert len(outputs) == len(blocks)
    if page.name == "rewards_evaluation.md":
        assert outputs[0][-1] == "[1.0, 0.0]"
        rows = {line.split("|")[1].strip(): line.split("|") for line in outputs[1] if line.startswith("| ")}
        assert (tmp_path / "eval-world" / "results.json").is_file()
        # The letters teacher beats the base on its own reward (0.785 against 0.658 on these 8 scenes).
        assert float(rows["letters teacher"][3]) > float(rows["base"][3]) + 0.05
    if page.name == "merging.md":
        assert outputs[0][-1] == "24" and (tmp_path / "world-merged" / "README.md").is_file()
    if page.name == "quickstart.md":
        assert (tmp_path / "world-opd" / "pytorch_lora_weights.safetensors").is_file()
        assert outputs[0][-1].startswith("{'kl/letters': ") and outputs[1][-1] == "(32, 32)"
