"""Sharded training through accelerate: the shipped presets, and 2-process CPU runs (gloo) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_diffusion_opd.scripts import launch as script_launch
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora


JOB = Path(__file__).with_name("_sharded_job.py")
OWN_PRESETS = ("fsdp2", "fsdp2_offload", "zero2", "zero3")


def test_package_presets_resolve_by_name_and_hide_trl_ones():
    presets = script_launch.accelerate_presets()
    for name in OWN_PRESETS:
        assert Path(presets[name]).parent.name == "accelerate_configs"
        assert Path(presets[name]).parent.parent.name == "trl_diffusion_opd"  # ours, not TRL's zero2/zero3
    assert "multi_gpu" in presets and "fsdp1" in presets  # TRL's stay reachable
    args = script_launch.resolve_accelerate_config(["--num_processes", "2", "--accelerate_config", "fsdp2"])
    assert args == ["--config_file", presets["fsdp2"], "--num_processes", "2"]
    assert script_launch.resolve_accelerate_config(["--accelerate_config", "zero3.yaml"])[1] == presets["zero3"]
    with pytest.raises(ValueError, match="neither a file nor a preset.*fsdp2"):
        script_launch.resolve_accelerate_config(["--accelerate_config", "fsdp3"])


def test_presets_are_accelerate_configs_that_launch():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    presets = script_launch.accelerate_presets()
    expected = {"fsdp2": ("FSDP", 2, False), "fsdp2_offload": ("FSDP", 2, True), "zero2": ("DEEPSPEED", 2, None)}
    expected["zero3"] = ("DEEPSPEED", 3, None)
    for name, (kind, level, offload) in expected.items():
        config = load_config_from_file(presets[name])
        assert config.distributed_type.value == kind
        if kind == "FSDP":
            assert config.fsdp_config["fsdp_version"] == level
            assert config.fsdp_config["fsdp_offload_params"] is offload
            # No layer class is named: accelerate wraps the family's `_no_split_modules`, so one file fits all.
            assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
            assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config
        else:
            assert config.deepspeed_config["zero_stage"] == level
        launch_command_parser().parse_args(["--config_file", presets[name], "--module", "x"])


@pytest.fixture(scope="module")
def toy_teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    common = {"rank": 4, "std": 0.3, "target_modules": ["attn.to_q", "attn.to_k", "attn.to_v"]}
    return [
        str(save_toy_lora(pipe, folder / "a", seed=1, **common)),
        str(save_toy_lora(pipe, folder / "b", seed=2, format="peft", **common)),
    ]


def _run_job(mode: str, out: Path, teachers: list[str], port: int, extra: dict | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(JOB.parent.parent)}
    if mode == "single":
        command = [sys.executable]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run(
        [*command, str(JOB), mode, str(out), *teachers, json.dumps(extra or {})],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(path.read_text()) for path in sorted(out.glob("result-rank*.json"))]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max().item() for k in a)


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_cpu_processes_equal_one_process(tmp_path, toy_teachers):
    """Same prompts and noise on both ranks: DDP and FSDP2 (gloo) must give the single-process losses, updated
    student, resumed student and adapter file; FSDP2 really shards (DTensor student) and switching adapters gathers
    nothing."""
    (single,) = _run_job("single", tmp_path / "single", toy_teachers, 0)
    moved = _max_diff(single["final"], single["initial"])
    assert moved > 1e-3  # the rounds changed the student
    assert _max_diff(single["resumed"], single["final"]) == 0.0  # resuming from checkpoint-2 is exact
    reference = load_file(str(tmp_path / "single" / "final" / "pytorch_lora_weights.safetensors"))
    for mode, port in (("ddp", 29641), ("fsdp2", 29642)):
        ranks = _run_job(mode, tmp_path / mode, toy_teachers, port)
        assert [r["world"] for r in ranks] == [2, 2]
        for rank in ranks:
            torch.testing.assert_close(rank["losses"], single["losses"], rtol=1e-5, atol=0)
            for key in ("initial", "final", "resumed"):
                assert _max_diff(rank[key], single[key]) <= 1e-6 * max(1.0, moved), (mode, key)
        exported = tmp_path / mode / "final" / "pytorch_lora_weights.safetensors"
        weights = load_file(str(exported))
        assert weights.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=1e-6)
        checkpoint = tmp_path / mode / "checkpoint-2"
        assert (checkpoint / "student_training_weights.safetensors").is_file()
        assert not (checkpoint / "pytorch_model_fsdp.bin").exists()  # the frozen base is never written
        if mode == "fsdp2":
            assert ranks[0]["parameter_types"] == ["DTensor"]
            switch = ranks[0]["switch"]
            assert switch["switch"] == 0  # activating a teacher and the student again: no all-gather
            assert switch["forward_a"] == switch["forward_student"] > 0  # a forward gathers each unit once
        else:
            assert ranks[0]["parameter_types"] == ["Parameter"]


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True])
def test_fsdp2_with_a_full_weight_teacher_equals_one_process(tmp_path, toy_teachers, offload):
    """Task b's teacher is a full transformer (toy teacher a, in diffusers format, fused into the base); task a keeps
    the PEFT-format LoRA teacher. Under FSDP2 the student's base is
    sharded while the full teacher stays a whole, unsharded copy on each rank (or, with `teacher_offload`, on the CPU
    between its calls): losses and the updated student equal the single-process run."""
    pipe = get_tiny_sd3_pipeline(with_t5=False)
    pipe.load_lora_weights(toy_teachers[0])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.transformer.save_pretrained(tmp_path / "full" / "transformer")
    teachers = [toy_teachers[1], str(tmp_path / "full")]
    extra = {"teacher_offload": offload}
    (single,) = _run_job("single", tmp_path / "single", teachers, 0, extra)
    assert single["full_teachers"] == {"b": ["Parameter"]}
    assert _max_diff(single["final"], single["initial"]) > 1e-3
    ranks = _run_job("fsdp2", tmp_path / "fsdp2", teachers, 29643 + offload, extra)
    for rank in ranks:
        assert rank["parameter_types"] == ["DTensor"]  # the student is sharded ...
        assert rank["full_teachers"] == {"b": ["Parameter"]}  # ... the full teacher is not
        torch.testing.assert_close(rank["losses"], single["losses"], rtol=1e-5, atol=0)
        for key in ("final", "resumed"):
            assert _max_diff(rank[key], single[key]) <= 1e-6, key
