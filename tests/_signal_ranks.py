"""Two gloo ranks (`torchrun --nproc_per_node 2 _signal_ranks.py OUT`) run `StopOnSignal` over three rounds; only
rank 1 gets a SIGTERM, during round 2. Each rank writes `OUT/rank<r>.json`: the step at which it was told to save and
stop, and the signal named. For `tests/test_checkpointing.py`."""

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
from transformers import TrainerControl

from trl_diffusion_opd.trainer.checkpointing import StopOnSignal


dist.init_process_group("gloo")
rank = dist.get_rank()
callback = StopOnSignal()
args, state = SimpleNamespace(device="cpu"), SimpleNamespace()
callback.on_train_begin(args, state, TrainerControl())
stopped = None
for step in (1, 2, 3):
    if step == 2 and rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
        while callback._received is None:  # the handler runs between bytecodes
            time.sleep(0.01)
    control = callback.on_step_end(args, state, TrainerControl())
    if control.should_training_stop:
        stopped = {"step": step, "save": control.should_save, "signal": callback.signal_name}
        break
callback.on_train_end(args, state, TrainerControl())
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(stopped))
dist.destroy_process_group()
