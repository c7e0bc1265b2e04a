"""What a round passes around: the guidance of one model's pass (`Guidance`) and a rollout in progress
(`RolloutState`). Plain data: the trainers fill and advance them (`DiffusionLoRATrainer._rollout_begin` /
`_rollout_step`); the tensor math is `transition`'s."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..families.base import Cond


@dataclass(frozen=True)
class Guidance:
    """The guidance of one model's pass: the student's (`guidance_scale`, `guidance_scale_2`), a teacher's (its
    spec's, else `teacher_guidance_scale[_2]`), or a rollout's override.

    Attributes:
        scale: Classifier-free guidance scale, or the guidance-embedding value of a guidance-distilled family; above 1
            the pass runs the negative (unconditional) branch too.
        scale_2: The second (low-noise) expert's scale on two-expert pipelines (Wan 2.2 A14B); `None` uses `scale`.
    """

    scale: float
    scale_2: float | None = None

    @property
    def needs_negative(self) -> bool:
        """Whether the pass needs the negative conditioning (CFG above 1)."""
        return self.scale > 1


@dataclass
class RolloutState:
    """A rollout in progress: made by `DiffusionLoRATrainer._rollout_begin`, advanced one sampler step at a time by
    `_rollout_step`. B rows, N sampler steps; `...` is the family's latent layout.

    Attributes:
        x: The current state x_{t_j}, `(B, ...)` float32, detached.
        j: Index of the next step (0 before the first).
        sigmas: The schedule `(N + 1,)` on the host, from 1 (noise) down to 0.
        sigmas_device: `sigmas` on the accelerator (one copy per rollout, not one per step).
        sigma_floats: `sigmas` as Python floats (one read-back per rollout, not one per step).
        t_guard: σ_1, the SDE samplers' guard against the singular first step.
        cond: The rows' conditioning (batch-first tensors).
        guidance: The rollout's guidance.
        negative: The negative conditioning of the B rows, or `None` when the guidance needs none.
        generator: Draws the SDE noise (it drew the initial latents).
        states: x_{t_0}..x_{t_j}, each `(B, ...)`, when the rollout keeps its trajectory (`keep_states`), else `None`.
    """

    x: torch.Tensor
    sigmas: torch.Tensor
    sigmas_device: torch.Tensor
    sigma_floats: list[float]
    t_guard: float
    cond: Cond
    guidance: Guidance
    negative: Cond | None
    generator: torch.Generator
    j: int = 0
    states: list[torch.Tensor] | None = field(default=None)

    def trajectory(self) -> torch.Tensor:
        """The kept states so far, `(j + 1, B, ...)`."""
        return torch.stack(self.states)
