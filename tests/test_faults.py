"""Fault suite: runs killed at seeded moments (SIGKILL, also inside checkpoint writes), preempted (SIGTERM), saving
onto a full disk, and started twice into one folder. Each case runs the real command in a subprocess
(`tests/_fault_run.py`, which counts the process's file writes and can SIGKILL it at the k-th) and relaunches it the
way a requeued job would, with `--resume_from_checkpoint auto`; the run must end with the adapter of an
uninterrupted run, bit for bit.

Marked `faults` (minutes of subprocesses): `make test-faults` runs them, `make test` does not.
"""

import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trl_diffusion_opd.scripts import launch as script_launch
from trl_diffusion_opd.trainer.checkpointing import OutputDirLock, checkpoint_problem


pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("_fault_run.py")
ROUNDS = 12
OPD = {
    "model_name_or_path": "tiny:sd3",
    "lora_r": 4,
    "lora_alpha": 4,
    "teachers": {"shapes": "toy:1"},
    "prompts": {"shapes": ["a red circle", "a blue square", "a green triangle"]},
    "resolution": 32,
    "num_inference_steps": 2,
    "max_sequence_length": 8,
    "guidance_scale": 1.0,
    "per_device_train_batch_size": 1,
    "max_steps": ROUNDS,
    "learning_rate": 5e-3,
    "ema": True,
    "ema_decay": 0.9,
    "ema_update_interval": 1,
    "seed": 0,
    "save_strategy": "steps",
    "save_steps": 1,
    "save_total_limit": 2,
    "logging_steps": 1,
    "disable_tqdm": True,
    "report_to": "none",
}
GRPO_ROUNDS = 8
GRPO = {
    "model_name_or_path": "tiny:sd3",
    "lora_r": 4,
    "lora_alpha": 4,
    "reward_funcs": ["brightness"],
    "prompts": ["a red circle", "a blue square", "a green triangle"],
    "resolution": 32,
    "num_inference_steps": 2,
    "max_sequence_length": 1,
    "guidance_scale": 1.0,
    "noise_level": 0.7,
    "num_generations": 2,
    "per_device_train_batch_size": 1,
    "num_iterations": 2,  # a checkpoint in the middle of a cycle stores the generated batch
    "beta": 0.0,
    "max_steps": GRPO_ROUNDS,
    "learning_rate": 3e-2,
    "seed": 0,
    "save_strategy": "steps",
    "save_steps": 1,
    "save_total_limit": 2,
    "logging_steps": 1,
    "disable_tqdm": True,
    "report_to": "none",
}


class Run:
    """One launch of the command in a subprocess, its output collected line by line as it comes."""

    def __init__(self, command, config, output_dir, tmp, extra=(), kill_at=0, when="before", fsize=None):
        self.log = Path(tmp) / f"events-{time.monotonic_ns()}.txt"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "FAULT_LOG": str(self.log),
            "FAULT_KILL_AT": str(kill_at),
            "FAULT_KILL_WHEN": when,
        }
        env.pop(script_launch.LAUNCHED_ENV, None)
        limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
        args = [sys.executable, str(RUNNER), command, "--config", str(config), "--output_dir", str(output_dir)]
        args += ["--resume_from_checkpoint", "auto", *extra]
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def rounds_logged(self) -> int:
        return sum(line.startswith("{'loss'") for line in self.stdout)

    def events(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.is_file() else []

    def wait_for(self, condition, timeout=600.0) -> bool:
        """Wait until `condition()` holds (True) or the process ends (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return True
            if self.process.poll() is not None:
                return condition()
            time.sleep(0.05)
        raise TimeoutError("the run neither reached the condition nor ended")

    def wait(self, timeout=900) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join()
        return code

    def report(self) -> str:
        return "\n".join(["--- stdout", *self.stdout[-15:], "--- stderr", *self.stderr[-25:]])


def _config(tmp_path: Path, name: str, values: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _checkpoints(output_dir: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in output_dir.glob("checkpoint-*")}


def _assert_last_checkpoint_complete(output_dir: Path) -> None:
    checkpoints = _checkpoints(output_dir)
    if checkpoints:
        last = checkpoints[max(checkpoints)]
        assert checkpoint_problem(last) is None, checkpoint_problem(last)


def _assert_same_result(output_dir: Path, reference: Path, rounds: int) -> None:
    """The exported adapter and the last checkpoint's training (and EMA) weights equal the reference's, bit for bit."""
    pairs = [(output_dir / "pytorch_lora_weights.safetensors", reference / "pytorch_lora_weights.safetensors")]
    for name in ("student_training_weights.safetensors", "ema_state.safetensors"):
        ours, theirs = output_dir / f"checkpoint-{rounds}" / name, reference / f"checkpoint-{rounds}" / name
        assert ours.is_file() == theirs.is_file()
        if theirs.is_file():
            pairs.append((ours, theirs))
    for ours, theirs in pairs:
        a, b = load_file(ours), load_file(theirs)
        assert a.keys() == b.keys()
        different = [key for key in a if not torch.equal(a[key], b[key])]
        assert not different, f"{ours.name}: {len(different)} of {len(a)} tensors differ from the uninterrupted run"


def _reference(tmp_path_factory, command: str, values: dict) -> tuple[Path, Path, int]:
    tmp = tmp_path_factory.mktemp(f"{command}-reference")
    config = _config(tmp, command, values)
    run = Run(command, config, tmp / "out", tmp)
    assert run.wait() == 0, run.report()
    events = run.events()
    # The output folder as the run left it: the adapter and the last two checkpoints, no partial folder nor lock holder
    assert sorted(_checkpoints(tmp / "out")) == [values["max_steps"] - 1, values["max_steps"]]
    assert not list((tmp / "out").glob(".partial-*"))
    return tmp / "out", config, len(events)


@pytest.fixture(scope="module")
def opd_reference(tmp_path_factory):
    return _reference(tmp_path_factory, "train", OPD)


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
    return _reference(tmp_path_factory, "grpo", GRPO)


def _kill_chain(command, config, output_dir, tmp, moments) -> list[str]:
    """Launch, kill at each moment in turn (relaunching with `auto` each time), then let the run finish; returns the
    event each launch was killed at. A moment is `("event", k, when)`: the process kills itself at its k-th write
    event; or `("parent", k)`: the test SIGKILLs it once k write events have happened, at whatever it is doing."""
    killed_at = []
    for moment in moments:
        if moment[0] == "event":
            run = Run(command, config, output_dir, tmp, kill_at=moment[1], when=moment[2])
        else:
            run = Run(command, config, output_dir, tmp)
            run.wait_for(lambda: len(run.events()) >= moment[1])
            run.process.send_signal(signal.SIGKILL)
        code = run.wait()
        assert code in (-signal.SIGKILL, 0), run.report()
        if code == 0:
            break  # the run ended before the moment came
        events = run.events()
        killed_at.append(f"{moment[-1]} {events[-1].split(' ', 1)[1] if events else 'start-up'}")
        _assert_last_checkpoint_complete(output_dir)
        OutputDirLock(output_dir).acquire().release()  # a killed run leaves no lock held (else this raises)
    final = Run(command, config, output_dir, tmp)
    assert final.wait() == 0, final.report()
    return killed_at


def _moments(seed: int, count: int, window: int, parent_kills: int) -> list[tuple]:
    """`count` seeded kill moments: each within the next `window` write events of its launch (about two checkpoints,
    so the kills spread over the whole run), before, inside or after the write; `parent_kills` of them from outside."""
    rng = random.Random(seed)
    moments = [("event", rng.randint(1, window), rng.choice(["before", "inside", "after"])) for _ in range(count)]
    for index in rng.sample(range(count), parent_kills):
        moments[index] = ("parent", rng.randint(1, window))
    return moments


def test_sigkill_at_seeded_moments_then_auto_resume_ends_bit_exact_with_ema(tmp_path, opd_reference):
    reference, config, _ = opd_reference
    # 9 write events per checkpoint (adapter, optimizer, scheduler, RNG, trainer state, training weights, EMA,
    # rename, rotation) and one at start-up (the toy teacher)
    moments = _moments(seed=0, count=11, window=19, parent_kills=2)
    killed_at = _kill_chain("train", config, tmp_path / "out", tmp_path, moments)
    assert len(killed_at) >= 10, killed_at
    assert any("inside save_file" in kill or "inside torch.save" in kill for kill in killed_at), killed_at
    assert any(kill.endswith(("publish", "rotate")) for kill in killed_at), killed_at
    _assert_same_result(tmp_path / "out", reference, ROUNDS)


def test_grpo_with_num_iterations_sigterm_then_sigkills_end_bit_exact(tmp_path, grpo_reference):
    reference, config, _ = grpo_reference
    output_dir = tmp_path / "out"
    # preempted once, with no periodic checkpoint: the signal's checkpoint must hold every completed round
    run = Run("grpo", config, output_dir, tmp_path, extra=["--save_strategy", "no"])
    run.wait_for(lambda: run.rounds_logged() >= 3)
    done = run.rounds_logged()
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 143, run.report()
    (step,) = _checkpoints(output_dir)
    assert done <= step < GRPO_ROUNDS
    assert run.stdout[-1] == (
        f"Stopped by SIGTERM after step {step}: checkpoint saved to {output_dir / f'checkpoint-{step}'}; resume with "
        'the same command and `--resume_from_checkpoint auto` (or `train(resume_from_checkpoint="auto")`).'
    )
    killed_at = _kill_chain("grpo", config, output_dir, tmp_path, _moments(seed=1, count=3, window=19, parent_kills=0))
    assert len(killed_at) == 3, killed_at
    _assert_same_result(output_dir, reference, GRPO_ROUNDS)


def test_sigterm_loses_no_round_and_a_full_disk_keeps_the_last_checkpoint(tmp_path, opd_reference):
    reference, config, _ = opd_reference
    output_dir = tmp_path / "out"
    run = Run("train", config, output_dir, tmp_path, extra=["--save_strategy", "no"])
    run.wait_for(lambda: run.rounds_logged() >= 2)
    done = run.rounds_logged()
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 143, run.report()
    (step,) = _checkpoints(output_dir)
    assert done <= step < ROUNDS  # 0 completed rounds lost
    assert run.stdout[-1].startswith(f"Stopped by SIGTERM after step {step}: checkpoint saved to ")
    before = {p.name: p.read_bytes() for p in (output_dir / f"checkpoint-{step}").iterdir()}

    # The next save fails: no file may exceed 40 kB (the optimizer state is 55 kB), as on a disk that fills up.
    full = Run("train", config, output_dir, tmp_path, fsize=40_000)
    assert full.wait() == 1, full.report()
    partial = output_dir / f".partial-checkpoint-{step + 1}" / f"checkpoint-{step + 1}"
    line = full.stderr[-1]
    prefix = f"trl-diffusion-opd train: error: Could not write checkpoint-{step + 1}: {partial / 'optimizer.pt'}: "
    assert line.startswith(prefix), full.report()
    assert line.endswith("the previous checkpoint is intact, resume from it with `--resume_from_checkpoint auto`.")
    assert "Traceback" not in "\n".join(full.stderr)
    assert sorted(_checkpoints(output_dir)) == [step]
    assert not list(output_dir.glob(".partial-*"))
    assert {p.name: p.read_bytes() for p in (output_dir / f"checkpoint-{step}").iterdir()} == before

    final = Run("train", config, output_dir, tmp_path)
    assert final.wait() == 0, final.report()
    _assert_same_result(output_dir, reference, ROUNDS)


def test_a_second_run_into_the_same_output_dir_refuses(tmp_path):
    output_dir = tmp_path / "out"
    lock = OutputDirLock(output_dir).acquire()  # this process is "the first run"
    try:
        config = _config(tmp_path, "train", OPD)
        second = Run("train", config, output_dir, tmp_path)
        assert second.wait() == 2, second.report()
        assert second.stderr[-1] == (
            f"trl-diffusion-opd train: error: {output_dir} is in use by another run (process {os.getpid()} holds "
            f"{output_dir / '.lock'}); wait for it to end or choose another `output_dir`."
        )
        assert sorted(p.name for p in output_dir.iterdir()) == [".lock"]  # nothing written, no toy teacher either
    finally:
        lock.release()
