"""Issue #7, item 3: variance of the closed-form KL gradient against the PPO-style sampled surrogate.

Setting: the tiny SD3 pipeline, a student LoRA moved away from the base (random non-zero B), one teacher LoRA, the
SDE sampler at noise level a, `normalization="paper"` (the exact per-step KL, whose gradient the PPO surrogate
estimates without bias). Gradients are taken w.r.t. all student LoRA parameters, flattened.

Two experiments per noise level:

1. Fixed states (the issue's protocol). One student rollout gives a batch of states x_tj (all trained steps of B
   prompts); student means mu_S (with grad) and teacher means mu_T are computed there once. The closed-form gradient
   is grad mean_rows closed_form_kl(mu_S, mu_T); the PPO-style gradient is grad mean_rows ppo_surrogate_loss(a, mu_S,
   mu_S.detach(), mu_T, std) for K transitions a ~ N(mu_S, std^2) sampled from the rollout policy. Reported: the
   cosine between the mean PPO gradient and the closed form (expected ~1: unbiased), and the total variances
   tr Cov. The closed form does not depend on the sampled transition, so its variance at fixed states is exactly 0
   (floating-point noise) and the ratio is infinite: the closed form is the PPO estimator with the transition
   integrated out (Rao-Blackwellised).
2. Whole rollouts (both estimators under all of training's randomness: initial noise and SDE noise). M independent
   student rollouts; on each, the closed-form gradient at its states and the PPO gradient at its states with its own
   sampled next states (what `loss_type="ppo"` does in the trainer). Reported: cosine between the two mean gradients
   and the variance ratio tr Cov(PPO) / tr Cov(closed form), which Rao-Blackwell says is > 1.

    python -m benchmarks.grad_variance [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig

from trl_diffusion_opd import transition
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline, save_toy_lora

from .common import TASK_PROMPTS, Timer, make_trainer, markdown_table, setup, write_results


TASK = "geneval"


class _Setup:
    """A trainer whose student differs from the base, plus helpers computing both gradient estimators."""

    def __init__(self, noise_level: float, num_steps: int, batch: int, folder: Path, seed: int = 0):
        torch.manual_seed(seed)
        pipe = get_tiny_sd3_pipeline(seed=seed, with_t5=False)
        teacher = save_toy_lora(pipe, folder / "teacher", seed=1, std=0.3)
        peft_config = LoraConfig(
            r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["attn.to_q", "attn.to_k", "attn.to_v"]
        )
        self.trainer = make_trainer(
            pipe,
            {TASK: str(teacher)},
            str(folder / "out"),
            peft_config=peft_config,
            resolution=32,
            num_inference_steps=num_steps,
            per_device_train_batch_size=batch,
            noise_level=noise_level,
            sde_type="sde",
            kl_normalization="paper",
            guidance_scale=1.0,
        )
        generator = torch.Generator().manual_seed(seed + 7)
        self.params = self.trainer.student_parameters
        with torch.no_grad():
            for name, param in self.trainer.accelerator.unwrap_model(self.trainer.model).named_parameters():
                if ".student." in name and "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        self.args = self.trainer.args
        self.family = self.trainer.family
        self.transformer = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.spec = self.trainer.teacher_specs[TASK][0]
        self.cond = self.trainer.prompt_cache(TASK_PROMPTS[TASK][:batch])
        self.batch = batch

    def rollout(self, seed: int) -> dict:
        return self.trainer.rollout(self.cond, torch.Generator().manual_seed(seed))

    def means(self, rollout: dict):
        """Rows of all trained steps: x, t, t_next, sampled next state, std, mu_S (grad), mu_T (no grad)."""
        args, steps = self.args, self.args.num_train_timesteps
        states, sigmas = rollout["states"], rollout["sigmas"]
        x = states[:steps].flatten(0, 1)
        sample = states[1 : steps + 1].flatten(0, 1)
        t = sigmas[:steps].repeat_interleave(self.batch)
        t_next = sigmas[1 : steps + 1].repeat_interleave(self.batch)
        t_guard = sigmas[1].item()
        cond = {k: v.repeat(steps, *([1] * (v.dim() - 1))) for k, v in self.cond.items()}

        def mean(v):
            return transition.step_mean(x, v, t, t_next, args.noise_level, "sde", t_guard)

        with torch.no_grad(), self.trainer.adapters.use(self.spec.name):
            mu_t = mean(self.family.velocity(self.transformer, x, t, cond))
        mu_s = mean(self.family.velocity(self.transformer, x, t, cond))
        std = transition.step_std(t, t_next, args.noise_level, "sde", t_guard)
        return {
            "x": x,
            "t": t,
            "t_next": t_next,
            "t_guard": t_guard,
            "sample": sample,
            "std": std,
            "mu_s": mu_s,
            "mu_t": mu_t,
        }

    def _grad(self, loss: torch.Tensor, retain: bool) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params, retain_graph=retain)
        return torch.cat([g.reshape(-1) for g in grads]).double()

    def closed_form_grad(self, m: dict, retain: bool = True) -> torch.Tensor:
        kl = transition.closed_form_kl(
            m["mu_s"], m["mu_t"], m["t"], m["t_next"], self.args.noise_level, "sde", "paper", m["t_guard"]
        )
        return self._grad(kl.mean(), retain)

    def ppo_grad(self, m: dict, sample: torch.Tensor, retain: bool = True) -> torch.Tensor:
        loss = transition.ppo_surrogate_loss(sample, m["mu_s"], m["mu_s"].detach(), m["mu_t"], m["std"])
        return self._grad(loss.mean(), retain)


def _stats(a: torch.Tensor) -> dict:
    """Mean vector and total variance (trace of the covariance) of the rows of `a`."""
    mean = a.mean(0)
    var = ((a - mean) ** 2).sum(1).mean().item() * a.shape[0] / max(a.shape[0] - 1, 1)
    return {"mean": mean, "total_var": var}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def fixed_states(s: _Setup, var_samples: int, mean_samples: int, seed: int = 0, chunk: int = 128) -> dict:
    """At one rollout's states. The PPO loss depends on the student's parameters only through mu_S, so each sampled
    transition's parameter gradient is J^T h_k with h_k = dL_k/dmu_S and J = dmu_S/dtheta: per-sample gradients (for
    the variance) cost one vector-Jacobian product each, and the mean over many samples costs one, J^T mean_k h_k."""
    m = s.means(s.rollout(seed))
    mu_s, mu_t, std = m["mu_s"], m["mu_t"], m["std"]
    args = s.args

    def vjp(h: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(mu_s, s.params, grad_outputs=h.to(mu_s.dtype), retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads]).double()

    def h_closed_form() -> torch.Tensor:
        leaf = mu_s.detach().requires_grad_(True)
        kl = transition.closed_form_kl(leaf, mu_t, m["t"], m["t_next"], args.noise_level, "sde", "paper", m["t_guard"])
        return torch.autograd.grad(kl.mean(), leaf)[0]

    rows = mu_s.shape[0]
    mean_old = mu_s.detach()
    std_b = std.reshape(-1, *([1] * (mean_old.dim() - 1)))
    generator = torch.Generator().manual_seed(seed + 1)

    def h_ppo(count: int) -> torch.Tensor:
        """`(count, rows, ...)`: dL/dmu_S of `count` independent sampled transitions (mean loss over rows each)."""
        shape = (count, *mean_old.shape)
        samples = (mean_old + std_b * torch.randn(shape, generator=generator)).flatten(0, 1)
        leaf = mean_old.repeat(count, *([1] * (mean_old.dim() - 1))).requires_grad_(True)
        loss = transition.ppo_surrogate_loss(
            samples,
            leaf,
            mean_old.repeat(count, *([1] * (mean_old.dim() - 1))),
            mu_t.repeat(count, *([1] * (mean_old.dim() - 1))),
            std.repeat(count),
        )
        return torch.autograd.grad(loss.sum() / rows, leaf)[0].view(shape)

    h_cf = h_closed_form()
    g_cf = vjp(h_cf)
    g_cf_again = vjp(h_closed_form())
    # mean of `mean_samples` PPO gradients = J^T (mean of their h)
    h_sum, done = torch.zeros_like(mean_old), 0
    while done < mean_samples:
        count = min(chunk, mean_samples - done)
        h_sum += h_ppo(count).sum(0)
        done += count
    h_mean = h_sum / mean_samples
    g_mean = vjp(h_mean)
    per_sample = torch.stack([vjp(h) for h in h_ppo(var_samples)])
    var_ppo = _stats(per_sample)["total_var"]
    rel_err = ((g_mean - g_cf).norm() / g_cf.norm()).item()
    expected = (var_ppo / mean_samples) ** 0.5 / g_cf.norm().item()
    return {
        "expected_cosine_if_unbiased": 1.0 / (1.0 + expected**2) ** 0.5,
        "rows": rows,
        "samples_mean": mean_samples,
        "samples_var": var_samples,
        "cosine": _cos(g_mean, g_cf),
        "cosine_latent_space": _cos(h_mean.flatten().double(), h_cf.flatten().double()),
        "rel_error_of_mean": rel_err,
        "expected_rel_error_if_unbiased": expected,
        "total_var_ppo": var_ppo,
        "total_var_closed_form": ((g_cf - g_cf_again) ** 2).sum().item(),
        "grad_norm_sq_closed_form": (g_cf**2).sum().item(),
    }


def whole_rollouts(s: _Setup, rollouts: int, seed: int = 1000) -> dict:
    cf, ppo = [], []
    for index in range(rollouts):
        m = s.means(s.rollout(seed + index))
        cf.append(s.closed_form_grad(m, retain=True))
        ppo.append(s.ppo_grad(m, m["sample"], retain=False))
    cf, ppo = torch.stack(cf), torch.stack(ppo)
    cf_stats, ppo_stats = _stats(cf), _stats(ppo)
    # Unbiasedness check: on the same states, PPO - CF has mean 0, so |mean diff| ~ sqrt(tr Var(diff) / M).
    diff = _stats(ppo - cf)
    noise = diff["total_var"] / rollouts / (cf_stats["mean"] ** 2).sum().item()
    return {
        # cos(mean PPO, mean CF) expected from the PPO noise alone, if PPO is unbiased
        "expected_cosine_if_unbiased": 1.0 / (1.0 + noise) ** 0.5,
        "bias_z": diff["mean"].norm().item() / (diff["total_var"] / rollouts) ** 0.5,
        "rollouts": rollouts,
        "cosine": _cos(ppo_stats["mean"], cf_stats["mean"]),
        "total_var_ppo": ppo_stats["total_var"],
        "total_var_closed_form": cf_stats["total_var"],
        "variance_ratio_ppo_over_closed_form": ppo_stats["total_var"] / cf_stats["total_var"],
        "grad_norm_sq_mean_closed_form": (cf_stats["mean"] ** 2).sum().item(),
    }


def run(quick: bool = False, write: bool = True) -> dict:
    setup()
    noise_levels = [0.7] if quick else [0.3, 0.7]
    var_samples, mean_samples, rollouts = (16, 256, 8) if quick else (192, 65536, 96)
    num_steps, batch = (4, 2) if quick else (10, 2)
    results = []
    with tempfile.TemporaryDirectory() as folder, Timer() as timer:
        for a in noise_levels:
            s = _Setup(a, num_steps, batch, Path(folder) / f"a{a}")
            fixed = fixed_states(s, var_samples, mean_samples)
            whole = whole_rollouts(s, rollouts)
            results.append({"noise_level": a, "fixed_states": fixed, "whole_rollouts": whole})
            print(
                f"[grad_variance] a={a}: fixed states cos={fixed['cosine']:.4f} var PPO={fixed['total_var_ppo']:.3g} "
                f"var CF={fixed['total_var_closed_form']:.3g} | rollouts cos={whole['cosine']:.4f} "
                f"var ratio={whole['variance_ratio_ppo_over_closed_form']:.3g}",
                flush=True,
            )
    rows_fixed = [
        [
            r["noise_level"],
            r["fixed_states"]["rows"],
            f"{r['fixed_states']['samples_mean']} / {r['fixed_states']['samples_var']}",
            f"**{r['fixed_states']['cosine']:.4f}** (~{r['fixed_states']['expected_cosine_if_unbiased']:.4f}; "
            f"mu-space {r['fixed_states']['cosine_latent_space']:.4f})",
            f"{r['fixed_states']['rel_error_of_mean']:.3f} (~{r['fixed_states']['expected_rel_error_if_unbiased']:.3f})",
            f"{r['fixed_states']['total_var_ppo']:.4g}",
            f"{r['fixed_states']['total_var_closed_form']:.3g}",
            f"{r['fixed_states']['grad_norm_sq_closed_form']:.4g}",
        ]
        for r in results
    ]
    rows_whole = [
        [
            r["noise_level"],
            r["whole_rollouts"]["rollouts"],
            f"{r['whole_rollouts']['cosine']:.4f} (~{r['whole_rollouts']['expected_cosine_if_unbiased']:.4f})",
            f"{r['whole_rollouts']['bias_z']:.2f}",
            f"{r['whole_rollouts']['total_var_ppo']:.4g}",
            f"{r['whole_rollouts']['total_var_closed_form']:.4g}",
            f"**{r['whole_rollouts']['variance_ratio_ppo_over_closed_form']:.4g}**",
            f"{r['whole_rollouts']['grad_norm_sq_mean_closed_form']:.4g}",
        ]
        for r in results
    ]
    markdown = (
        "Tiny SD3 (2 blocks, hidden 32, 16x16 latents), student LoRA r8 (B ~ N(0, 0.1^2), so student != base), toy "
        f"teacher LoRA r4, SDE sampler, `normalization='paper'`, no CFG, N={num_steps} steps, T={num_steps - 1} "
        f"trained steps, B={batch} prompts. Gradient = all student LoRA parameters, mean loss over rows. "
        "Total variance = trace of the covariance of one estimate.\n\n"
        "**Fixed states** (one rollout's states; K transitions a ~ N(mu_S, std^2) from the rollout policy). A "
        f"sample's parameter gradient is J^T dL/dmu_S, so the mean over K={mean_samples} transitions costs one "
        f"vector-Jacobian product; the variance uses {var_samples} per-sample gradients. The closed form does not "
        "depend on a: "
        "its variance is 0 up to float noise (shown: squared difference of two evaluations), so the ratio is "
        "infinite at fixed states.\n\n"
        + markdown_table(
            [
                "a",
                "rows (T*B)",
                "K (mean / variance)",
                "cos(mean PPO grad, CF grad) (~expected if unbiased; in mu-space)",
                "‖mean PPO - CF‖ / ‖CF‖ (expected if unbiased)",
                "tr Var PPO",
                "tr Var CF",
                "‖CF‖²",
            ],
            rows_fixed,
        )
        + "\n\n**Whole rollouts** (initial noise and SDE noise re-sampled; each estimator on the same rollout).\n\n"
        + markdown_table(
            [
                "a",
                "rollouts M",
                "cos(mean PPO, mean CF) (~expected if unbiased)",
                "‖mean(PPO - CF)‖ / sqrt(tr Var(PPO - CF) / M) (~1 if unbiased)",
                "tr Var PPO",
                "tr Var CF",
                "variance ratio PPO / CF",
                "‖mean CF‖²",
            ],
            rows_whole,
        )
    )
    config = {
        "pipeline": "tiny SD3",
        "num_inference_steps": num_steps,
        "batch": batch,
        "noise_levels": noise_levels,
        "K_mean": mean_samples,
        "K_var": var_samples,
        "M": rollouts,
        "seconds": round(timer.seconds, 1),
    }
    data = {"results": results}
    if write:
        write_results("grad_variance", "Closed-form KL vs PPO-style gradient variance", config, data, markdown)
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    ns = parser.parse_args(argv)
    run(quick=ns.quick, write=not ns.no_write)


if __name__ == "__main__":
    main()
