"""`trainer/checkpointing.py`: complete-or-absent checkpoints, `resume_from_checkpoint` `true` / `auto`, the output
folder's lock, the stop on SIGTERM / SIGINT and the one-line error of a failed save. The same behaviours end to end,
with killed and preempted subprocesses, are `tests/test_faults.py`."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerControl

from trl_diffusion_opd import DiffusionOPDConfig, DiffusionOPDTrainer, cli
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora
from trl_diffusion_opd.trainer import checkpointing
from trl_diffusion_opd.trainer.checkpointing import (
    CheckpointWriteError,
    OutputDirBusyError,
    OutputDirLock,
    StopOnSignal,
    last_complete_checkpoint,
    publish_checkpoint,
    resolve_resume,
    staging_run_dir,
    write_error,
)


def _complete(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.full((2,), float(step))}, str(folder / "student_training_weights.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_last_complete_checkpoint_skips_incomplete_and_partial_folders(tmp_path):
    out = tmp_path / "out"
    assert resolve_resume("auto", out) == (None, "auto")  # no folder yet: start the run
    with pytest.raises(ValueError, match=r"holds no checkpoint-<step> folder; `--resume_from_checkpoint auto` starts"):
        resolve_resume(True, out)
    _complete(out / "checkpoint-2", 2)
    _complete(out / "checkpoint-10", 10)  # the highest step, not the last in name order
    _complete(out / "checkpoint-12", 12).joinpath("trainer_state.json").unlink()  # the Trainer's last file missing
    _complete(out / "checkpoint-13", 13).joinpath("optimizer.pt").write_bytes(b"PK\x03")  # truncated
    (out / "checkpoint-14").mkdir()  # an older version, killed while writing
    _complete(staging_run_dir(out, 15) / "checkpoint-15", 15)  # being written (or killed) now
    (out / "checkpoint-16").write_text("not a folder")
    last, skipped = last_complete_checkpoint(out)
    assert last == str(out / "checkpoint-10")
    assert skipped == [
        f"`resume_from_checkpoint`: {out / 'checkpoint-14'} is not a checkpoint of this package (no "
        "student_training_weights.safetensors).",
        f"`resume_from_checkpoint`: {out / 'checkpoint-13' / 'optimizer.pt'} is truncated or not a file written by "
        "torch.save.",
        f"{out / 'checkpoint-12'} has no trainer_state.json",
    ]
    for value in (True, "true", "TRUE", "auto"):
        assert resolve_resume(value, out)[0] == str(out / "checkpoint-10")
    assert resolve_resume(str(out / "checkpoint-2"), out) == (str(out / "checkpoint-2"), "path")
    assert resolve_resume(None, out) == resolve_resume("false", out) == (None, "none")


def test_publish_renames_the_staged_checkpoint_and_replaces_one_of_the_same_step(tmp_path):
    out = tmp_path / "out"
    _complete(out / "checkpoint-3", 3)
    _complete(staging_run_dir(out, 3) / "checkpoint-3", 33)
    assert publish_checkpoint(out, 3) == out / "checkpoint-3"
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text()) == {"global_step": 33}
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]  # the staging folder and the old copy are gone
    _complete(staging_run_dir(out, 4) / "checkpoint-4", 4)
    checkpointing.remove_partial_checkpoints(out)  # a killed run's leftover
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]


def test_lock_refuses_while_another_process_holds_it_and_a_killed_holder_leaves_none(tmp_path):
    out = tmp_path / "out"
    holder = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode()); print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n"
        with pytest.raises(OutputDirBusyError) as error:
            OutputDirLock(out).acquire()
        assert str(error.value) == (
            f"{out} is in use by another run (process {process.pid} holds {out / '.lock'}); wait for it to end or "
            "choose another `output_dir`."
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    lock = OutputDirLock(out).acquire()  # the OS dropped the killed holder's lock
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"
    again = OutputDirLock(out).acquire()  # re-entrant within a process (the command, then `train`)
    again.release()
    assert OutputDirLock._held[os.path.realpath(out / ".lock")][1] == 1
    lock.release()
    assert os.path.realpath(out / ".lock") not in OutputDirLock._held
    fresh = tmp_path / "fresh"
    OutputDirLock(fresh).acquire().release(remove=True)  # what a command that fails on its input does
    assert not fresh.exists()


def _wait_for(condition) -> None:
    end = time.monotonic() + 10
    while not condition() and time.monotonic() < end:  # Python runs a signal handler between bytecodes
        time.sleep(0.01)


def test_stop_on_signal_saves_and_stops_at_the_round_end_and_a_second_signal_exits_at_once():
    callback = StopOnSignal()
    args, state = SimpleNamespace(device="cpu"), SimpleNamespace()
    outer = signal.getsignal(signal.SIGINT)
    # Python's own handler as the one to fall back to (a pytest-xdist worker ignores SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.getsignal(signal.SIGINT)
    callback.on_train_begin(args, state, TrainerControl())
    try:
        control = callback.on_step_end(args, state, TrainerControl())
        assert not control.should_save and not control.should_training_stop and callback.signal_name is None
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the round in progress goes on
        _wait_for(lambda: callback._received is not None)
        control = callback.on_step_end(args, state, TrainerControl())
        assert control.should_save and control.should_training_stop and callback.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # the second one: the previous handler, at once
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False)
        assert signal.getsignal(signal.SIGINT) is previous
    finally:
        callback.on_train_end(args, state, TrainerControl())
        signal.signal(signal.SIGINT, outer)
    callback.on_train_begin(args, state, TrainerControl())  # a new `train` call starts clean
    assert callback.signal_name is None and not callback.on_step_end(args, state, TrainerControl()).should_save
    callback.on_train_end(args, state, TrainerControl())
    assert signal.getsignal(signal.SIGTERM) is not callback._handler


def test_write_error_names_the_file_and_leaves_bugs_alone(tmp_path):
    staging = tmp_path / ".partial-checkpoint-7"
    (staging / "checkpoint-7").mkdir(parents=True)
    (staging / "checkpoint-7" / "a.json").write_text("{}")
    time.sleep(0.01)
    (staging / "checkpoint-7" / "optimizer.pt").write_bytes(b"PK")  # the newest: being written
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    message = str(write_error(torch_error, staging, 7))
    assert message.startswith(
        f"Could not write checkpoint-7: {staging / 'checkpoint-7' / 'optimizer.pt'}: [enforce fail at "
        "inline_container.cc:672] . unexpected pos 704 vs 598 ("
    )
    assert message.endswith(
        " free on its disk); the previous checkpoint is intact, resume from it with `--resume_from_checkpoint auto`."
    )
    full = OSError(errno.ENOSPC, "No space left on device", "/x/scheduler.pt")
    assert str(write_error(full, staging, 7)).startswith(
        "Could not write checkpoint-7: /x/scheduler.pt: No space left"
    )
    assert write_error(RuntimeError("shape mismatch"), staging, 7) is None
    assert write_error(KeyError("bug"), staging, 7) is None


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint_and_resumes(tmp_path, monkeypatch):
    pipeline = get_tiny_sd3_pipeline(with_t5=False)
    teacher = save_toy_lora(pipeline, tmp_path / "teacher", seed=1, rank=2)
    out = tmp_path / "out"
    args = DiffusionOPDConfig(
        output_dir=str(out),
        max_steps=3,
        resolution=32,
        num_inference_steps=2,
        per_device_train_batch_size=1,
        max_sequence_length=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        ema=True,
        ema_update_interval=1,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DiffusionOPDTrainer(pipeline, {"a": str(teacher)}, args=args, train_dataset={"a": ["a red circle"]})
    real_save = torch.save

    def save(obj, path, *a, **k):  # the disk fills up while checkpoint-2 writes its optimizer state
        if "checkpoint-2" in str(path) and str(path).endswith("optimizer.pt"):
            Path(path).write_bytes(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointWriteError) as error:
        trainer.train()
    partial = out / ".partial-checkpoint-2" / "checkpoint-2" / "optimizer.pt"
    assert str(error.value).startswith(f"Could not write checkpoint-2: {partial}: No space left on device")
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["checkpoint-1"]  # no partial folder left
    assert last_complete_checkpoint(out)[0] == str(out / "checkpoint-1")  # save_total_limit=1 kept it
    monkeypatch.setattr(torch, "save", real_save)
    trainer.train(resume_from_checkpoint="auto")  # the lock was released by the failed run
    assert trainer.state.global_step == 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]


@pytest.mark.slow  # two fresh interpreters under torchrun: about 45 s on a loaded 2-core CPU
def test_every_rank_stops_at_the_step_where_any_rank_got_the_signal(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(Path(__file__).with_name("_signal_ranks.py")), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # rank 0 got no signal, and stops with rank 1
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "step": 2,
            "save": True,
            "signal": "SIGTERM",
        }


RL_RUN = {
    "model_name_or_path": "tiny:sd3",
    "lora_r": 4,
    "lora_alpha": 4,
    "reward_funcs": ["brightness"],
    "prompts": ["a red circle", "a blue square", "a green triangle"],
    "resolution": 32,
    "num_inference_steps": 2,
    "max_sequence_length": 1,
    "guidance_scale": 1.0,
    "num_generations": 2,
    "per_device_train_batch_size": 1,
    "num_iterations": 2,
    "learning_rate": 3e-2,
    "seed": 0,
    "logging_steps": 1,
    "disable_tqdm": True,
    "report_to": "none",
}


@pytest.mark.parametrize(
    "command, settings, step",
    [("grpo", {"noise_level": 0.7, "beta": 0.0, "max_steps": 8}, 5), ("nft", {"max_steps": 4}, 3)],
)
def test_resuming_a_stored_batch_read_back_off_alignment_is_bit_exact(tmp_path, command, settings, step):
    # The GRPO run of the fault suite (and its NFT twin): checkpoint `step`, in the middle of a `num_iterations`
    # cycle, stores the batch where safetensors reads the pooled prompt embedding off 16-byte alignment (28 and 60
    # bytes past a 64-byte boundary here); a CPU linear layer rounds such an input differently (before the fix 28 of
    # 30 GRPO tensors ended ~1e-7 off), so the batch must be read back into aligned memory for the resumed step to
    # compute the uninterrupted run's bits. `test_safe_loading` checks the alignment itself.
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({**RL_RUN, **settings, "save_steps": step}))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main([command, "--config", str(config), "--output_dir", str(straight)]) == 0
    checkpoint = resumed / f"checkpoint-{step}"
    shutil.copytree(straight / checkpoint.name, checkpoint)
    argv = ["--config", str(config), "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)]
    assert cli.main([command, *argv]) == 0
    ours = load_file(resumed / "pytorch_lora_weights.safetensors")
    theirs = load_file(straight / "pytorch_lora_weights.safetensors")
    assert ours.keys() == theirs.keys()
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []
