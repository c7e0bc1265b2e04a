"""The offline tiny pipelines: they run, are deterministic, save/reload exactly and resolve by Hub id offline."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

from trl_diffusion_opd.testing import (
    TINY_RESOLUTION,
    get_tiny_flux_pipeline,
    get_tiny_sd3_pipeline,
    save_to_hub_cache,
)


BUILDERS = {
    "sd3": lambda: get_tiny_sd3_pipeline(seed=0),
    "sd3-no-t5": lambda: get_tiny_sd3_pipeline(seed=0, with_t5=False),
    "flux-dev": lambda: get_tiny_flux_pipeline(seed=0),
    "flux-schnell": lambda: get_tiny_flux_pipeline(seed=0, guidance_embeds=False),
}


def _sample(pipe, seed=0):
    kwargs = {"max_sequence_length": 32} if isinstance(pipe, FluxPipeline) else {}
    return pipe(
        ["a red circle", "the letter k"],
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tiny_pipeline_runs_end_to_end_and_is_deterministic(name):
    pipe = BUILDERS[name]()
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    images = _sample(pipe)
    assert images.shape == (2, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(images).all()
    # Same seed -> same weights and same images; another seed -> other weights.
    np.testing.assert_array_equal(images, _sample(BUILDERS[name]()))
    other = get_tiny_sd3_pipeline(seed=1) if name.startswith("sd3") else get_tiny_flux_pipeline(seed=1)
    assert not torch.equal(next(pipe.transformer.parameters()), next(other.transformer.parameters()))


def test_size_knob_builds_a_larger_transformer():
    tiny = get_tiny_sd3_pipeline()
    small = get_tiny_sd3_pipeline(num_layers=4, num_attention_heads=4, attention_head_dim=64)
    assert small.transformer.config.num_layers == 4
    assert small.transformer.inner_dim == 256
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small.transformer) > 10 * count(tiny.transformer)


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_save_and_reload_gives_identical_outputs(name, tmp_path):
    pipe = BUILDERS[name]()
    pipe.save_pretrained(tmp_path / "pipe")
    cls = StableDiffusion3Pipeline if name.startswith("sd3") else FluxPipeline
    reloaded = cls.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_sample(pipe), _sample(reloaded))


def test_loads_by_hub_id_from_local_cache_offline(tmp_path):
    pipe = get_tiny_sd3_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    cache = tmp_path / "hub"
    snapshot = save_to_hub_cache(tmp_path / "pipe", "tiny-org/tiny-sd3", cache)
    assert (snapshot / "model_index.json").is_file()
    expected = _sample(pipe)
    # A fresh interpreter, so that HF_HUB_OFFLINE is read at import time as users set it.
    script = (
        "import numpy as np, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained('tiny-org/tiny-sd3')\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe(['a red circle', 'the letter k'], num_inference_steps=2, height=32, width=32,\n"
        "           generator=torch.Generator().manual_seed(0), output_type='np').images\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_unknown_hub_id_fails_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(Exception):
        DiffusionPipeline.from_pretrained("tiny-org/does-not-exist")


def test_offline_python_quick_start_runs(tmp_path, monkeypatch):
    """`examples/tiny_quickstart.py`, the README's offline Python route (`tiny:sd3` with `toy:<seed>` teachers, then
    the same with `get_tiny_sd3_pipeline` and `save_toy_lora`), runs as written, with 2 rounds instead of 60."""
    from pathlib import Path

    torch.set_num_threads(1)
    code = (Path(__file__).resolve().parents[1] / "examples" / "tiny_quickstart.py").read_text()
    assert code.count("max_steps=60") == 1
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code.replace("max_steps=60", "max_steps=2"), "tiny_quickstart.py", "exec"), namespace)
    trainer, from_objects = namespace["trainer"], namespace["trainer_from_objects"]
    assert trainer.state.global_step == 2 and len(trainer.state.log_history) > 0
    assert (tmp_path / "tiny-diffusion-opd" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "tiny-diffusion-opd" / "_toy_teachers" / "text" / "pytorch_lora_weights.safetensors").is_file()
    assert "This is a LoRA adapter for `tiny:sd3`," in (tmp_path / "tiny-diffusion-opd" / "README.md").read_text()
    assert [spec.local_dir.resolve() for specs in from_objects.teacher_specs.values() for spec in specs] == [
        tmp_path / "teachers" / "shapes",
        tmp_path / "teachers" / "text",
    ]
