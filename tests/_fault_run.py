"""`python _fault_run.py ARGS...`: the `trl-diffusion-opd ARGS...` command with a fault injected, for
`tests/test_faults.py`. Test-only: nothing of it exists in the package.

Every *write event* of the process is counted and appended to the file `$FAULT_LOG` (one line: its number and
name). The events: each call of `torch.save`, of safetensors' `save_file`, of `TrainerState.save_to_json`, the rename
that publishes a checkpoint (`publish_checkpoint`) and the rotation of older checkpoints (`rotate_checkpoints`).

With `FAULT_KILL_AT=k`, the process SIGKILLs itself at event k: `FAULT_KILL_WHEN=before` before the call, `after`
after it, `inside` in the middle of it (a tensor file half written; the rotation with half of the oldest checkpoint
deleted).
"""

import os
import signal
import sys
from pathlib import Path

import safetensors.torch
import torch
from transformers.trainer_callback import TrainerState

from trl_diffusion_opd import cli, safe_io
from trl_diffusion_opd.trainer import base_trainer


LOG = os.environ.get("FAULT_LOG")
KILL_AT = int(os.environ.get("FAULT_KILL_AT", "0"))
WHEN = os.environ.get("FAULT_KILL_WHEN", "before")
count = 0


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def _event(name: str, call, half=None):
    global count
    count += 1
    if LOG:
        with open(LOG, "a") as log:
            log.write(f"{count} {name}\n")
    if count != KILL_AT:
        return call()
    if WHEN == "before":
        _kill()
    if WHEN == "inside" and half is not None:
        half()
        _kill()
    result = call()
    _kill()
    return result


def _half_file(path):
    def write():
        data = os.urandom(1024)
        Path(path).write_bytes(data[: len(data) // 2])

    return write


def _wrap_file_writer(real, name):
    def wrapper(obj, path, *args, **kwargs):
        half = _half_file(path) if isinstance(path, (str, os.PathLike)) else None
        return _event(f"{name} {Path(str(path)).name}", lambda: real(obj, path, *args, **kwargs), half)

    return wrapper


def _rotation(real):
    def wrapper(run_dir, *args, **kwargs):
        def half():
            checkpoints = sorted(Path(run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            if len(checkpoints) > 2:  # what the rotation would delete first, half-deleted
                files = sorted(p for p in checkpoints[0].iterdir() if p.is_file())
                for file in files[: len(files) // 2 + 1]:
                    file.unlink()

        return _event("rotate", lambda: real(run_dir, *args, **kwargs), half)

    return wrapper


torch.save = _wrap_file_writer(torch.save, "torch.save")
save_file = _wrap_file_writer(safetensors.torch.save_file, "save_file")
safetensors.torch.save_file = save_file
base_trainer.save_file = save_file
safe_io.save_file = save_file
_state_to_json = TrainerState.save_to_json
TrainerState.save_to_json = lambda self, path: _event(
    "trainer_state", lambda: _state_to_json(self, path), _half_file(path)
)
_publish = base_trainer.publish_checkpoint
base_trainer.publish_checkpoint = lambda run_dir, step: _event("publish", lambda: _publish(run_dir, step))
base_trainer.rotate_checkpoints = _rotation(base_trainer.rotate_checkpoints)

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
