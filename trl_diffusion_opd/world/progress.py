"""A progress bar per training phase of the world's demo and teachers."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback, ProgressCallback


class PhaseProgress(ProgressCallback):
    """One progress bar for a training phase, its postfix the last logged metrics (instead of transformers'
    `ProgressCallback`, which writes every logged dict as a line between the bars).

    Args:
        desc: Name of the phase, left of the bar.
        keys: Prefixes of the logged metrics shown (`kl/` by default: the KL to each teacher).
        unit: What one step is called on the bar.
    """

    def __init__(self, desc: str, keys: tuple[str, ...] = ("kl/",), unit: str = "round"):
        super().__init__()
        self.desc = desc
        self.keys = keys
        self.unit = unit

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k.split("/", 1)[-1]: f"{v:.3g}" for k, v in logs.items() if k.startswith(self.keys)}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def set_progress(trainer, progress: bool, bar: PhaseProgress) -> None:
    """Show `bar` instead of transformers' per-log lines, or (`progress=False`) nothing at all: with `disable_tqdm`
    the Trainer prints every logged dict instead (`PrinterCallback`); the metrics stay in `state.log_history`."""
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(bar)
    else:
        trainer.remove_callback(PrinterCallback)
