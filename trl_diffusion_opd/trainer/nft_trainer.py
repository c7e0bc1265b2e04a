"""`DiffusionNFTTrainer`: DiffusionNFT, online RL on the forward process, for one LoRA (Stage 1 teachers and the
paper's NFT baselines)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from transformers import TrainerCallback

from .. import transition
from ..families.base import cond_select, cond_tile
from ..objectives import nft_loss, nft_optimality
from ..teachers import add_adapter
from .base_trainer import STUDENT
from .nft_config import DiffusionNFTConfig
from .rl_trainer import DiffusionRLTrainer, RewardFunc


OLD = "old"
OLD_PREFIX = "old_policy."


class _OldPolicyCallback(TrainerCallback):
    def __init__(self, trainer: DiffusionNFTTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.update_old_policy(args.old_policy_decay(state.global_step))


class DiffusionNFTTrainer(DiffusionRLTrainer):
    r"""Trainer for DiffusionNFT (Zheng et al., 2025): negative-aware fine-tuning on the forward process.

    The *old* policy θ_old is a second adapter, a slow average of the student: after optimizer step k,
    θ_old ← η_k θ_old + (1 − η_k) θ with η_k = min(`old_policy_decay_rate`·k, `old_policy_max_decay`). Each step:

    1. The old policy samples `num_generations` clean images x0 per prompt with a deterministic sampler (Euler or
       Heun; CFG-free by default); the rewards' weighted total R gives advantages A = (R − mean_g R)/(std + 1e-4)
       and optimality probabilities r = clip(A, −c, c)/(2c) + ½ ∈ [0, 1] (c = `adv_clip_max`).
    2. At each trained time t (the first ⌊N·timestep_fraction⌋ sigmas of the schedule) the image is noised on the
       forward process, x_t = (1 − t) x0 + t ε with fresh ε, and the current and old velocities v_θ, v_old give the
       implicit positive and negative policies

           v⁺ = β v_θ + (1 − β) v_old,        v⁻ = (1 + β) v_old − β v_θ,

       with clean-image predictions x̂0^± = x_t − t v^±.
    3. The loss, with the adaptive per-sample weights w^± = mean|x̂0^± − x0| (constants of the gradient), is

           L = r ‖x̂0⁺ − x0‖² / w⁺ + (1 − r) ‖x̂0⁻ − x0‖² / w⁻   (+ β_KL ‖v_θ − v_ref‖²),

       element-averaged, then averaged over times and images and scaled by c/β like the released code (so its
       learning rates transfer). High-reward images pull v⁺ (hence v_θ) toward them; low-reward ones push v⁻
       toward them, hence v_θ away. At v_old = v_θ, r ≡ ½ gives a zero gradient and r ≡ 1 gives β times the
       gradient of the weighted flow-matching loss toward x0 (`objectives.nft_loss`).

    No likelihoods, no SDE: any deterministic sampler and CFG-free training work.

    Args:
        model: The base pipeline: a Hub id, a local path, or a `DiffusionPipeline` of a supported model family.
        reward_funcs: Reward names from `trl_diffusion_opd.rewards`, `Reward`s or functions
            `fn(images, prompts, metadata) -> scores`; several are summed with `args.reward_weights`.
        args: The `DiffusionNFTConfig`.
        train_dataset: Prompts with metadata (a list, a dataset or file with a `prompt` column, or `{task: source}`).
        eval_dataset: Held-out prompts for the reward grids of `RewardEvalCallback`.
        peft_config: The student adapter; `None` uses the family's default (r=32, alpha=64).
        callbacks: Extra `TrainerCallback`s.
    """

    _tag_names = ["trl", "diffusion-nft", "diffusers", "lora"]
    _name = "DiffusionNFT"
    _paper = {
        "title": "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
        "id": "2509.16117",
        "citation": (
            "@article{zheng2025diffusionnft,\n"
            "    title   = {{DiffusionNFT: Online Diffusion Reinforcement with Forward Process}},\n"
            "    author  = {Zheng, Kaiwen and others},\n"
            "    journal = {arXiv preprint arXiv:2509.16117},\n"
            "    year    = {2025}\n"
            "}"
        ),
    }

    def __init__(
        self,
        model: str | DiffusionPipeline,
        reward_funcs: RewardFunc | Sequence[RewardFunc],
        args: DiffusionNFTConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = DiffusionNFTConfig(f"{str(name).split('/')[-1]}-DiffusionNFT")
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, peft_config, callbacks)
        self.add_callback(_OldPolicyCallback(self))

    # ------------------------------------------------------------------ the old policy
    def _add_auxiliary_adapters(self, transformer, args) -> None:
        add_adapter(transformer, copy.deepcopy(self.peft_config), OLD)
        set_peft_model_state_dict(transformer, self._peft_state(transformer, STUDENT), adapter_name=OLD)
        cast_training_params(transformer, torch.float32)  # (still trainable here) the same dtype as the student
        for name, param in transformer.named_parameters():
            if f".{OLD}." in name:
                param.data = param.data.float()

    @staticmethod
    def _peft_state(transformer, adapter: str) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter).items()}

    def _adapter_pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        named = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        return [(named[n.replace(f".{STUDENT}.", f".{OLD}.")], p) for n, p in named.items() if f".{STUDENT}." in n]

    @torch.no_grad()
    def update_old_policy(self, decay: float) -> None:
        """θ_old ← decay · θ_old + (1 − decay) · θ (decay 0 copies the student)."""
        for old, current in self._adapter_pairs():
            old.mul_(decay).add_(current.detach(), alpha=1.0 - decay)

    def _extra_checkpoint_state(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {OLD_PREFIX + k: v.detach().cpu().contiguous() for k, v in self._peft_state(model, OLD).items()}

    def _load_extra_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            model = self.accelerator.unwrap_model(self.model)
            old = {k[len(OLD_PREFIX) :]: v for k, v in state.items()}
            set_peft_model_state_dict(model, old, adapter_name=OLD)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_batch(self, rows: list[dict], generator: torch.Generator) -> dict[str, Any]:
        """Clean latents from the old policy's deterministic sampler, `generation_batch_size` rows per call.

        Returns:
            `x0` `(R, ...)`, the `sigmas` `(N + 1,)` of the schedule and `cond` (R rows).
        """
        args = self.args
        cond = self.prompt_cache([row["prompt"] for row in rows])
        sigmas = self.family.sigmas(args.num_inference_steps, args.resolution)
        transformer = self.accelerator.unwrap_model(self.model)
        size = args.generation_batch_size or len(rows)
        guidance = self.student_guidance
        finals = []
        with self.adapters.use(OLD):
            for start in range(0, len(rows), size):
                part = cond_select(cond, list(range(start, min(start + size, len(rows)))))
                count = len(range(start, min(start + size, len(rows))))
                negative = self._negative(count) if guidance.needs_negative else None
                x = self.family.init_latents(count, args.resolution, generator).to(args.device)
                for j in range(args.num_inference_steps):
                    t, t_next = sigmas[j].item(), sigmas[j + 1].item()
                    sigma = sigmas[j].expand(count).to(args.device)
                    velocity = self._velocity(transformer, x, sigma, part, guidance, negative)
                    euler = transition.step_mean(x, velocity, t, t_next)
                    if args.sampler == "heun" and t_next > 0:
                        sigma_next = sigmas[j + 1].expand(count).to(args.device)
                        v_next = self._velocity(transformer, euler, sigma_next, part, guidance, negative)
                        x = transition.heun_mean(x, velocity, v_next, t, t_next)
                    else:
                        x = euler
                finals.append(x)
        return {"x0": torch.cat(finals), "sigmas": sigmas, "cond": cond}

    # ------------------------------------------------------------------ loss
    def step_terms(self, model, batch: dict[str, Any], steps: range, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row NFT terms at trained times `steps` (rows time-major: `len(steps) × R`), with grad through v_θ.

        Args:
            noise: ε of the forward process, `(len(steps) × R, ...)`.

        Returns:
            `loss` (the unscaled `objectives.nft_loss`), `r`, and with `beta > 0` `kl`, all `(len(steps) × R,)`.
        """
        args = self.args
        count = batch["x0"].shape[0]
        x0 = batch["x0"].repeat(len(steps), *([1] * (batch["x0"].dim() - 1)))
        t = batch["sigmas"][steps.start : steps.stop].repeat_interleave(count).to(x0.device)
        t_b = t.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1.0 - t_b) * x0 + t_b * noise
        cond = cond_tile(batch["cond"], len(steps))
        guidance = self.student_guidance
        negative = self._negative(x0.shape[0]) if guidance.needs_negative else None
        with torch.no_grad(), self.adapters.use(OLD):
            v_old = self._velocity(model, x_t, t, cond, guidance, negative)
        v_theta = self._velocity(model, x_t, t, cond, guidance, negative)
        r = nft_optimality(batch["advantages"], args.adv_clip_max).repeat(len(steps))
        terms = {"loss": nft_loss(x_t, t, v_theta, v_old, x0, r, args.nft_beta), "r": r}
        terms["old_deviation"] = (v_theta.detach() - v_old).pow(2).flatten(1).mean(1)
        if args.beta > 0:
            with torch.no_grad(), self.adapters.use(None):
                v_ref = self._velocity(model, x_t, t, cond, guidance, negative)
            terms["kl"] = (v_theta - v_ref).pow(2).flatten(1).mean(1)
        return terms

    def compute_rl_loss(self, model, batch: dict[str, Any], backward: bool = True) -> float:
        args = self.args
        num_steps = args.num_train_timesteps
        count = batch["x0"].shape[0]
        generator = self._generator("nft-noise", self.state.global_step, self.accelerator.process_index)
        noise = torch.randn((num_steps * count, *batch["x0"].shape[1:]), generator=generator).to(batch["x0"].device)
        scale = args.adv_clip_max / args.nft_beta
        total = 0.0
        deviations, kls = [], []
        for steps in self._chunks(num_steps):
            rows = slice(steps.start * count, steps.stop * count)
            with self.compute_loss_context_manager():
                terms = self.step_terms(model, batch, steps, noise[rows])
                per_row = scale * terms["loss"]
                if args.beta > 0:
                    per_row = per_row + args.beta * terms["kl"]
                loss = per_row.sum() / (num_steps * count)
            if backward:
                self._backward(loss)
            total += loss.item()
            deviations.append(terms["old_deviation"])
            if args.beta > 0:
                kls.append(terms["kl"].detach())
        self._metrics["old_deviation"].append(torch.cat(deviations).mean().item())
        if kls:
            self._metrics["kl"].append(torch.cat(kls).mean().item())
        return total

    # ------------------------------------------------------------------ model card
    def _model_card_details(self) -> dict[str, Any]:
        args = self.args
        paper = self._paper
        summary = (
            f"trained with\n**DiffusionNFT** ([{paper['title']}](https://arxiv.org/abs/{paper['id']}))\n"
            f"{self._reward_summary()}: online RL on the forward process, contrasting implicit positive and "
            f"negative policies on groups of {args.num_generations} samples per prompt."
        )
        settings = {
            "NFT β": args.nft_beta,
            "old-policy sampler": f"{args.sampler} (deterministic)",
            "old-policy decay": f"min({args.old_policy_decay_rate} · step, {args.old_policy_max_decay})",
            "KL coefficient (to the base)": args.beta,
            "images per prompt": args.num_generations,
            "advantages": f"{args.scale_rewards} std, clipped at ±{args.adv_clip_max}",
            "prompts per task and device": args.per_device_train_batch_size,
        }
        return {
            "summary": summary,
            "rewards": self._reward_card_rows(),
            "tags": [r.name for r in self.reward_funcs],
            "settings": settings,
            "papers": [paper],
        }
