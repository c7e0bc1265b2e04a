"""Per-round bookkeeping whose cost does not grow with the number of adapters on the model.

torch's `Module.eval()`, `zero_grad()` and `parameters()` walk every submodule: with hundreds of LoRA teachers on the
transformer (each adds its own `lora_A`/`lora_B`/dropout modules to every targeted layer) those walks cost more than
a tiny model's round. Only the student trains, so the round needs neither: the model is already in eval mode
(`ensure_eval` checks that on a cached flat list of modules), and only the student's parameters ever hold gradients
(`StudentGrads` clears and clips those, in the model's parameter order, so the clipped norm is bit-identical).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref

import torch
from torch.nn.modules.module import register_module_module_registration_hook


# Bumped whenever any module anywhere gains a submodule (`add_module`, attribute assignment, `ModuleDict` items):
# a cached module list older than the last bump may be missing modules, so it is rebuilt.
_registrations = itertools.count()
_generation = next(_registrations)


def _on_registration(module, name, submodule):
    global _generation
    _generation = next(_registrations)


register_module_module_registration_hook(_on_registration)

_MODULES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, list[torch.nn.Module]]] = weakref.WeakKeyDictionary()


def _modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """`list(model.modules())`, rebuilt only when a submodule was registered somewhere since the last build (the list
    may then hold removed modules too, which only makes `ensure_eval` call `model.eval()` when it need not)."""
    cached = _MODULES.get(model)
    if cached is None or cached[0] != _generation:
        cached = _MODULES[model] = (_generation, list(model.modules()))
    return cached[1]


def ensure_eval(model: torch.nn.Module) -> None:
    """`model.eval()`, skipped when no module of `model` is in training mode (then it would change nothing)."""
    if any(module.training for module in _modules(model)):
        model.eval()


class StudentGrads:
    """The trainable parameters of a model whose other parameters are frozen, in `model.parameters()` order, read
    once: the Trainer's gradient clipping and `zero_grad` over these equal those over all parameters (a frozen
    parameter never receives a gradient) without walking the frozen adapters' modules."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.parameters = [param for param in model.parameters() if param.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """`Module.zero_grad` over the trainable parameters only."""
        for param in self.parameters:
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    if param.grad.grad_fn is not None:
                        param.grad.detach_()
                    else:
                        param.grad.requires_grad_(False)
                    param.grad.zero_()

    @contextlib.contextmanager
    def installed(self):
        """`model.zero_grad` is this object's for the duration (the Trainer calls it after every optimizer step)."""
        self.model.zero_grad = self.zero_grad
        try:
            yield self
        finally:
            del self.model.zero_grad
