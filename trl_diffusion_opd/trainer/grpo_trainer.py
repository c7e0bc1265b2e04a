"""`FlowGRPOTrainer`: Flow-GRPO, optionally with GRPO-Guard's ratio normalisation, for one LoRA (Stage 1 teachers
and the paper's multi-task RL baselines)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from transformers import TrainerCallback

from .. import transition
from ..families.base import cond_select, cond_tile
from ..objectives import grpo_guard_log_ratio, grpo_guard_step_weight, ppo_clip_loss, zero_std_groups
from .grpo_config import FlowGRPOConfig
from .rl_trainer import DiffusionRLTrainer, RewardFunc


def select_rows(batch: dict[str, Any], index: list[int]) -> dict[str, Any]:
    """The rows `index` of a Flow-GRPO batch (the keys of `generate_batch` and `make_batch`)."""
    out = dict(batch)
    picked = torch.tensor(index, dtype=torch.long)
    for key in ("states", "log_probs", "means"):
        out[key] = batch[key][:, picked.to(batch[key].device)]
    for key in ("x0", "rewards", "advantages"):
        out[key] = batch[key][picked.to(batch[key].device)]
    out["scores"] = batch["scores"][:, picked.to(batch["scores"].device)]
    out["cond"] = cond_select(batch["cond"], index)
    out["rows"] = [batch["rows"][i] for i in index]
    return out


GRPO_GUARD_PAPER = {
    "title": "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated Clipping",
    "id": "2510.22319",
    "citation": (
        "@article{wang2025grpoguard,\n"
        "    title   = {{GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated Clipping}},\n"
        "    author  = {Wang, Jing and others},\n"
        "    journal = {arXiv preprint arXiv:2510.22319},\n"
        "    year    = {2025}\n"
        "}"
    ),
}


class FlowGRPOTrainer(DiffusionRLTrainer):
    r"""Trainer for Flow-GRPO (Liu et al., 2025) and GRPO-Guard (Wang et al., 2025) on a LoRA student.

    Each optimizer step, for `per_device_train_batch_size` prompts per task: `num_generations` trajectories of the
    stochastic sampler x_{j+1} ~ N(μ_θ(x_j), σ̄_j² I) (Flow-GRPO's SDE or CPS, noise level a, CFG as configured),
    storing each transition's log-probability log p_old and mean μ_old. log p is Flow-GRPO's: the per-element mean
    of the Gaussian log-density for the SDE; for CPS −mean((x′ − μ)²) by default, or the exact per-element density
    with `cps_log_prob="gaussian"` (`transition.step_log_prob`). The decoded images are scored and their weighted
    total reward R gives group-normalised advantages A = (R − mean_g R)/(std + 1e-4) (exactly 0 for a group of equal
    rewards, which `drop_zero_std_groups` removes), clipped to ±`adv_clip_max`. At each of the first
    ⌊N·timestep_fraction⌋ steps μ_θ is recomputed with grad at the stored state and

        loss_j = max(−A ρ_j, −A clip(ρ_j, 1 − ε, 1 + ε)) · w_j + β ‖μ_θ − μ_ref‖² / (2 σ_j² D),

    with ρ_j = exp(log p_θ(x_{j+1}) − log p_old(x_{j+1})), w_j = 1 (Flow-GRPO), or with GRPO-Guard's RatioNorm
    ρ_j = exp(σ̄_j (log p_θ − log p_old + b_j)), b_j = ‖μ_θ − μ_old‖² / (2 D σ̄_j²) per image or its batch mean
    (`grpo_guard_bias`), with Gaussian log-densities, and w_j = 1/|Δt_j| (see `objectives.grpo_guard_log_ratio`).
    CPS's step into t = 0 is deterministic (σ̄ = 0): its exact log-ratio and RatioNorm are 0. μ_ref is the base model's mean (the adapter disabled). The loss is averaged
    over steps and images and back-propagated step chunk by step chunk; one optimizer step follows (or
    `num_iterations` on the same batch).

    Args:
        model: The base pipeline: a Hub id, a local path, or a `DiffusionPipeline` of a supported model family.
        reward_funcs: Reward names from `trl_diffusion_opd.rewards` (`"ocr"`, `"pickscore"`, ...), `Reward`s or
            functions `fn(images, prompts, metadata) -> scores`; several are summed with `args.reward_weights`.
        args: The `FlowGRPOConfig`.
        train_dataset: Prompts with metadata (a list, a dataset or file with a `prompt` column, or `{task: source}`).
        eval_dataset: Held-out prompts for the reward grids of `RewardEvalCallback`.
        peft_config: The student adapter; `None` uses the family's default (r=32, alpha=64).
        callbacks: Extra `TrainerCallback`s.
    """

    _tag_names = ["trl", "flow-grpo", "diffusers", "lora"]
    _name = "Flow-GRPO"
    _paper = {
        "title": "Flow-GRPO: Training Flow Matching Models via Online RL",
        "id": "2505.05470",
        "citation": (
            "@article{liu2025flowgrpo,\n"
            "    title   = {{Flow-GRPO: Training Flow Matching Models via Online RL}},\n"
            "    author  = {Liu, Jie and others},\n"
            "    journal = {arXiv preprint arXiv:2505.05470},\n"
            "    year    = {2025}\n"
            "}"
        ),
    }

    def __init__(
        self,
        model: str | DiffusionPipeline,
        reward_funcs: RewardFunc | Sequence[RewardFunc],
        args: FlowGRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = FlowGRPOConfig(f"{str(name).split('/')[-1]}-Flow-GRPO")
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, peft_config, callbacks)

    @property
    def uses_grpo_guard(self) -> bool:
        return self.args.ratio_normalization == "grpo_guard"

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def generate_batch(self, rows: list[dict], generator: torch.Generator) -> dict[str, Any]:
        """SDE rollouts, `generation_batch_size` rows per call.

        Returns:
            `states` `(N + 1, R, ...)`, `log_probs` `(N, R)` (`transition.step_log_prob`: Flow-GRPO's), `means`
            `(N, R, ...)`, `sigmas` `(N + 1,)`, `x0` `(R, ...)` (the final latents) and `cond` (R rows).
        """
        cond = self.prompt_cache([row["prompt"] for row in rows])
        size = self.args.generation_batch_size or len(rows)
        parts = []
        for start in range(0, len(rows), size):
            index = list(range(start, min(start + size, len(rows))))
            parts.append(self.rollout(cond_select(cond, index), generator, cps_log_prob=self.args.cps_log_prob))
        batch = {key: torch.cat([p[key] for p in parts], dim=1) for key in ("states", "log_probs", "means")}
        batch["sigmas"] = parts[0]["sigmas"]
        batch["x0"] = batch["states"][-1]
        batch["cond"] = cond
        return batch

    @torch.no_grad()
    def make_batch(self, rows: list[dict], generator: torch.Generator) -> dict[str, Any]:
        """`DiffusionRLTrainer.make_batch`, then (with `drop_zero_std_groups`) without the groups whose rewards are all
        equal, as Flow-GRPO's `train_sd3.py` filters samples whose advantages are all 0. A batch of only such groups
        is kept whole, so that every process runs the same backward passes."""
        batch = super().make_batch(rows, generator)
        constant = zero_std_groups(batch["rewards"], self.args.num_generations)
        self._metrics["zero_std_fraction"].append(constant.float().mean().item())
        if self.args.drop_zero_std_groups and constant.any() and not constant.all():
            keep = (~constant).repeat_interleave(self.args.num_generations).nonzero().flatten()
            batch = select_rows(batch, keep.tolist())
        return batch

    # ------------------------------------------------------------------ loss
    def step_terms(self, model, batch: dict[str, Any], steps: range) -> dict[str, torch.Tensor]:
        """Per-row terms of trained steps `steps` (rows step-major: `len(steps) × R`), with grad through μ_θ.

        Returns:
            `log_ratio` (plain or GRPO-Guard normalised), `log_prob`, `old_log_prob`, `step_weight` and, with
            `beta > 0`, `kl` (to the base model), all `(len(steps) × R,)`.
        """
        args = self.args
        x, t, t_next = self._step_rows(batch["states"], batch["sigmas"], steps)
        rows = x.shape[0]
        t_guard = batch["sigmas"][1].item()
        cond = cond_tile(batch["cond"], len(steps))
        guidance = self.student_guidance
        negative = self._negative(rows) if guidance.needs_negative else None
        v = self._velocity(model, x, t, cond, guidance, negative)
        mean = transition.step_mean(x, v, t, t_next, args.noise_level, args.sde_type, t_guard)
        std = transition.step_std(t, t_next, args.noise_level, args.sde_type, t_guard)
        sample = batch["states"][steps.start + 1 : steps.stop + 1].flatten(0, 1)
        old_mean = batch["means"][steps.start : steps.stop].flatten(0, 1)
        old_log_prob = batch["log_probs"][steps.start : steps.stop].flatten()
        log_prob = transition.step_log_prob(sample, mean, std, args.sde_type, args.cps_log_prob)
        terms = {"log_prob": log_prob, "old_log_prob": old_log_prob}
        if self.uses_grpo_guard:
            if args.sde_type == "cps" and args.cps_log_prob != "gaussian":
                # RatioNorm is derived for the Gaussian log-density: use it whatever the stored convention
                log_prob = transition.gaussian_log_prob(sample, mean, std, "mean")
                old_log_prob = transition.gaussian_log_prob(sample, old_mean, std, "mean")
            terms["log_ratio"] = grpo_guard_log_ratio(
                log_prob, old_log_prob, mean, old_mean, std, args.grpo_guard_bias, num_groups=len(steps)
            )
            terms["step_weight"] = grpo_guard_step_weight(t, t_next).to(x.device)
        else:
            terms["log_ratio"] = log_prob - old_log_prob
            terms["step_weight"] = torch.ones(rows, device=x.device)
        if args.beta > 0:
            with torch.no_grad(), self.adapters.use(None):
                v_ref = self._velocity(model, x, t, cond, guidance, negative)
                ref_mean = transition.step_mean(x, v_ref, t, t_next, args.noise_level, args.sde_type, t_guard)
            terms["kl"] = transition.closed_form_kl(
                mean, ref_mean, t, t_next, args.noise_level, args.sde_type, "reference", t_guard
            )
        return terms

    def compute_rl_loss(self, model, batch: dict[str, Any], backward: bool = True) -> float:
        args = self.args
        num_steps = args.num_train_timesteps
        count = len(batch["rows"])
        total = 0.0
        ratios, clipped, kls = [], [], []
        for steps in self._chunks(num_steps):
            with self.compute_loss_context_manager():
                terms = self.step_terms(model, batch, steps)
                advantages = batch["advantages"].repeat(len(steps))
                policy = ppo_clip_loss(terms["log_ratio"], advantages, args.clip_range) * terms["step_weight"]
                rows = policy + args.beta * terms["kl"] if args.beta > 0 else policy
                loss = rows.sum() / (num_steps * count)
            if backward:
                self._backward(loss)
            total += loss.item()
            ratio = terms["log_ratio"].detach().exp()
            ratios.append(ratio)
            clipped.append(((ratio - 1).abs() > args.clip_range).float())
            if args.beta > 0:
                kls.append(terms["kl"].detach())
        ratio = torch.cat(ratios)
        self._metrics["ratio/mean"].append(ratio.mean().item())
        self._metrics["ratio/min"].append(ratio.min().item())
        self._metrics["ratio/max"].append(ratio.max().item())
        self._metrics["clip_fraction"].append(torch.cat(clipped).mean().item())
        if kls:
            self._metrics["kl"].append(torch.cat(kls).mean().item())
        return total

    # ------------------------------------------------------------------ model card
    def _model_card_details(self) -> dict[str, Any]:
        args = self.args
        paper = self._paper
        summary = f"trained with\n**Flow-GRPO** ([{paper['title']}](https://arxiv.org/abs/{paper['id']}))"
        papers = [paper]
        if self.uses_grpo_guard:
            summary += (
                f" with **GRPO-Guard**'s ratio normalisation ([{GRPO_GUARD_PAPER['title']}]"
                f"(https://arxiv.org/abs/{GRPO_GUARD_PAPER['id']}))"
            )
            papers.append(GRPO_GUARD_PAPER)
        summary += f"\n{self._reward_summary()}: online RL on groups of {args.num_generations} SDE samples per prompt."
        settings = {
            "ratio normalisation": "GRPO-Guard (RatioNorm + step reweighting)" if self.uses_grpo_guard else "none",
            "clip range": args.clip_range,
            "KL coefficient (to the base)": args.beta,
            "images per prompt": args.num_generations,
            "advantages": f"{args.scale_rewards} std, clipped at ±{args.adv_clip_max}",
            "optimizer steps per batch": args.num_iterations,
            "prompts per task and device": args.per_device_train_batch_size,
        }
        tags = [r.name for r in self.reward_funcs] + (["grpo-guard"] if self.uses_grpo_guard else [])
        return {
            "summary": summary,
            "rewards": self._reward_card_rows(),
            "tags": tags,
            "settings": settings,
            "papers": papers,
        }
