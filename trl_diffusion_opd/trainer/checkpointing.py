"""Checkpoints that survive what ends runs on shared clusters: preemption, a kill at any moment, a full disk.

* Atomic checkpoints: a checkpoint is written into `output_dir/.partial-checkpoint-N/checkpoint-N`, flushed to disk
  and only then renamed to `output_dir/checkpoint-N` (`publish_checkpoint`), so a folder under the final name is
  always complete and a kill at any moment leaves the previous checkpoint as the last one. Leftover partial folders
  of a killed run are ignored by the lookups (their names do not match `checkpoint-<step>`) and removed at the next
  save (`remove_partial_checkpoints`).
* `check_checkpoint`: a checkpoint's files (`TRAINING_WEIGHTS`, `EMA_STATE`, the Trainer's own) are complete and
  readable before a resume loads any model.
* `last_complete_checkpoint` / `resolve_resume`: what `resume_from_checkpoint` `true` and `auto` resume from.
* `OutputDirLock`: `output_dir/.lock`, held with `fcntl.flock` for the whole run, so a second run writing into the
  same folder refuses to start; the OS releases it when the process dies, so a killed run never leaves it stale.
* `StopOnSignal`: on SIGTERM / SIGINT, finish the round, checkpoint and stop (a second signal exits at once).
* `CheckpointWriteError`: a save that failed (disk full, unwritable folder), as one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import threading
import zipfile
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .config_checks import _first_line


logger = logging.get_logger(__name__)

PARTIAL_PREFIX = ".partial-"
LOCK_NAME = ".lock"
RESUME_AUTO = "auto"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")

# Files of a checkpoint folder written by the trainers besides the Trainer's own (`DiffusionLoRATrainer`).
TRAINING_WEIGHTS = "student_training_weights.safetensors"
EMA_STATE = "ema_state.safetensors"
TRAINING_ARGS = "training_args.json"


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. no space left on the device); the previous checkpoint is untouched."""


class OutputDirBusyError(RuntimeError):
    """Another run holds the lock of the output folder."""


# ---------------------------------------------------------------------------------------------- checkpoint files
def check_checkpoint(folder: str | os.PathLike, name: str = "resume_from_checkpoint") -> Path:
    """Check a checkpoint folder of these trainers before resuming from it, so that a missing or corrupt file is one
    line naming it, not a traceback after the models are loaded.

    Checked: the folder exists; `student_training_weights.safetensors` is there and is a readable safetensors file;
    `trainer_state.json`, when present, is a JSON object; the pickled states (`optimizer.pt`, `scheduler.pt`,
    `rng_state.pth`, ...) are complete torch archives; the other safetensors files (`ema_state.safetensors`, stored
    RL batches) are readable.

    Raises:
        ValueError: the folder or one of its files is missing or malformed.
    """
    from safetensors import safe_open

    path = Path(os.path.expanduser(str(folder)))
    if not path.is_dir():
        raise ValueError(
            f"`{name}` must be a checkpoint folder (e.g. output_dir/checkpoint-100), but '{folder}' "
            f"{'is a file' if path.exists() else 'does not exist'}."
        )
    weights = path / TRAINING_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"`{name}`: {path} is not a checkpoint of this package (no {TRAINING_WEIGHTS}).")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own SafetensorError, and OSError
        raise ValueError(f"`{name}`: {weights} is not a valid safetensors file ({_first_line(error)}).") from error
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            if not isinstance(json.loads(state.read_text(encoding="utf-8")), dict):
                raise ValueError("not a JSON object")
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"`{name}`: {state} is not valid JSON ({_first_line(error)}).") from error
    for file in sorted([*path.glob("*.pt"), *path.glob("*.pth")]):
        if not zipfile.is_zipfile(file):
            raise ValueError(f"`{name}`: {file} is truncated or not a file written by torch.save.")
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError, and OSError
            raise ValueError(f"`{name}`: {file} is not a valid safetensors file ({_first_line(error)}).") from error
    return path


# ---------------------------------------------------------------------------------------------- atomic checkpoints
def staging_run_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The folder that plays `output_dir` while checkpoint `step` is written: the Trainer puts the checkpoint in
    `<this>/checkpoint-<step>`, and `publish_checkpoint` moves it next to the others once it is complete."""
    return Path(run_dir) / f"{PARTIAL_PREFIX}{PREFIX_CHECKPOINT_DIR}-{step}"


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete the partial checkpoints that a killed run left in `run_dir`."""
    for path in Path(run_dir).glob(f"{PARTIAL_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
        shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk: a checkpoint renamed into place before
    its data reached the disk could come back truncated after the node loses power."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root))


def publish_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """Move the complete checkpoint `step` from its staging folder to `run_dir/checkpoint-<step>` (one rename) and
    remove the staging folder. An existing folder of that name (a step saved twice) is replaced, never left missing
    while the new one is not in place yet: it is moved aside first, and deleted after.

    Returns:
        The final checkpoint folder.
    """
    staging = staging_run_dir(run_dir, step)
    source = staging / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    target = Path(run_dir) / source.name
    fsync_tree(source)
    if target.exists():
        os.replace(target, staging / "replaced")
    os.replace(source, target)
    _fsync(Path(run_dir))
    shutil.rmtree(staging, ignore_errors=True)
    return target


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a checkpoint that resuming can use (one line), or `None` when it is complete: the
    package's and the Trainer's files are there (`trainer_state.json` is the Trainer's last) and none is truncated
    (`check_checkpoint`)."""
    folder = Path(folder)
    try:
        check_checkpoint(folder)
    except ValueError as error:
        return str(error)
    if not (folder / "trainer_state.json").is_file():
        return f"{folder} has no trainer_state.json"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The `checkpoint-<step>` folder of `output_dir` with the highest step that is complete (`checkpoint_problem`),
    or `None`, and the problems of the newer ones skipped (written by an older version and killed, or half-deleted
    by a rotation that was killed), newest first."""
    if not os.path.isdir(output_dir):
        return None, []
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := _CHECKPOINT.match(p.name))]
    skipped = []
    for _, path in sorted(found, reverse=True):
        if not path.is_dir():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            for line in skipped:
                logger.warning(f"Skipping an incomplete checkpoint: {line}")
            return str(path), skipped
        skipped.append(problem)
    return None, skipped


def resolve_resume(value: str | bool | os.PathLike | None, output_dir: str | os.PathLike) -> tuple[str | None, str]:
    """The checkpoint folder that `resume_from_checkpoint=value` resumes from, and how it was chosen.

    Args:
        value: `None` / `False` / "false": start the run. `True` / "true": the last complete checkpoint of
            `output_dir` (transformers' meaning: an error when there is none). "auto": the last complete checkpoint
            when there is one, else start the run (so a requeued job's command works after a kill at any moment).
            Anything else: that folder.
        output_dir: Where the run's checkpoints are.

    Returns:
        `(folder or None, mode)` with `mode` one of "none", "true", "auto", "path".

    Raises:
        ValueError: `True` and `output_dir` holds no complete checkpoint (one line, with the newest one's problem).
    """
    if value is None or value is False or str(value).lower() == "false":
        return None, "none"
    text = str(value).lower()
    if value is True or text in ("true", RESUME_AUTO):
        mode = RESUME_AUTO if text == RESUME_AUTO else "true"
        last, skipped = last_complete_checkpoint(output_dir)
        if last is None and mode == "true":
            what = f"no complete checkpoint-<step> folder ({skipped[0]})" if skipped else "no checkpoint-<step> folder"
            raise ValueError(
                f"`resume_from_checkpoint=True` but {output_dir} holds {what}; "
                f"`--resume_from_checkpoint {RESUME_AUTO}` starts the run when there is none."
            )
        return last, mode
    return str(value), "path"


# ---------------------------------------------------------------------------------------------- failed saves
def _names_a_write_failure(error: BaseException) -> bool:
    # Neither torch.save's RuntimeError ("unexpected pos ...", "PytorchStreamWriter failed writing file ...") nor
    # safetensors' SafetensorError ("I/O error: No space left on device (os error 28)") is an OSError.
    if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":
        return True
    return isinstance(error, RuntimeError) and bool(
        re.search(r"PytorchStreamWriter|inline_container|iostream error", str(error))
    )


# What `torch.save` writes into a checkpoint (the Trainer's optimizer, scheduler and RNG states)
_TORCH_FILES = (".pt", ".pth", ".bin")


def _newest_file(folder: Path, suffixes: tuple[str, ...] | None = None) -> Path | None:
    """The most recently modified file under `folder` (of one of `suffixes`, when given)."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    if suffixes is not None:
        files = [p for p in files if p.suffix in suffixes]
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if free < 1000:
            return f"{free:.3g} {unit}"
        free /= 1000
    return f"{free:.3g} TB"


def write_error(error: BaseException, staging: Path, step: int) -> CheckpointWriteError | None:
    """A one-line `CheckpointWriteError` for a save of checkpoint `step` that failed with `error`, naming the file
    (the error's own `filename`, else the file being written: the newest in the staging folder) and the free space
    of its disk; `None` when `error` is not an I/O failure (a bug, which keeps its traceback)."""
    if not _names_a_write_failure(error):
        return None
    # torch's and safetensors' errors name no file: the one being written is the newest file of that library's kind
    # (a file written by other code in the same instant, e.g. the model card, must not be taken for it).
    kinds = None
    if type(error).__name__ == "SafetensorError":
        kinds = (".safetensors",)
    elif not isinstance(error, OSError):
        kinds = _TORCH_FILES
    path = getattr(error, "filename", None) or _newest_file(staging, kinds) or _newest_file(staging) or staging
    if isinstance(error, OSError) and error.errno:
        reason = os.strerror(error.errno)
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointWriteError(
        f"Could not write checkpoint-{step}: {path}: {reason} ({_free_space(staging)} free on its disk); the previous "
        f"checkpoint is intact, resume from it with `--resume_from_checkpoint {RESUME_AUTO}`."
    )


# ---------------------------------------------------------------------------------------------- lock
class OutputDirLock:
    """`output_dir/.lock`, held with an exclusive `fcntl.flock` while a run writes into `output_dir`.

    Re-entrant within a process (the command takes it before loading the models, `train` again), released at the
    last `release` or when the process dies, whatever kills it. Where `fcntl` does not exist (Windows) it does nothing.
    """

    _held: dict[str, list] = {}  # real path -> [file descriptor, count]
    _guard = threading.Lock()

    def __init__(self, output_dir: str | os.PathLike):
        self.path = os.path.realpath(os.path.join(os.path.expanduser(str(output_dir)), LOCK_NAME))

    def acquire(self) -> OutputDirLock:
        """Take the lock.

        Raises:
            OutputDirBusyError: another process holds it (one line naming the folder and that process).
        """
        try:
            import fcntl
        except ImportError:
            return self
        with self._guard:
            if self.path in self._held:
                self._held[self.path][1] += 1
                return self
            created = not os.path.isdir(os.path.dirname(self.path))
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputDirBusyError(
                    f"{os.path.dirname(self.path)} is in use by another run (process {owner} holds {self.path}); "
                    "wait for it to end or choose another `output_dir`."
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._held[self.path] = [fd, 1, created]
        return self

    def release(self, remove: bool = False) -> None:
        """Give the lock back (at the last release of this process).

        Args:
            remove: Also delete the lock file, and `output_dir` when taking the lock created it and it is still
                empty: a run that failed before writing anything leaves nothing behind.
        """
        with self._guard:
            held = self._held.get(self.path)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                if remove:
                    os.unlink(self.path)  # while still held, so no other run takes the file being deleted
                os.close(held[0])  # closing the descriptor drops the flock
                del self._held[self.path]
                if remove and held[2]:
                    with contextlib.suppress(OSError):  # not empty: something else was written there
                        os.rmdir(os.path.dirname(self.path))


# ---------------------------------------------------------------------------------------------- preemption
class StopOnSignal(TrainerCallback):
    """Stop training cleanly on SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C).

    The handler only sets a flag; at the end of the round in progress the callback asks the Trainer to save a
    checkpoint and stop. Under several processes the flag is all-reduced (max) once per round, so every rank stops
    at the same step even when the signal reached only some. A second signal restores the previous handler and
    re-raises, which exits at once. `signal_name` says which signal stopped the run (`None` when none did).
    """

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self._received is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self._received = signum
        logger.warning(
            f"{signal.Signals(signum).name} received: finishing the round, saving a checkpoint and stopping "
            "(send it again to exit at once)."
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        self.signal_name = None
        self._received = None
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {signum: signal.signal(signum, self._handler) for signum in self.signals}

    def on_step_end(self, args, state, control, **kwargs):
        received = self._received or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([received], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag.item())
        if received:
            self.signal_name = signal.Signals(received).name
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
