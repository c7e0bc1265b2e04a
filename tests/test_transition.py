import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from trl_diffusion_opd.transition import (
    CPS_LOG_PROBS,
    KL_NORMALIZATIONS,
    LOG_PROB_REDUCTIONS,
    SAMPLERS,
    closed_form_kl,
    flow_grpo_cps_log_prob,
    gaussian_log_prob,
    ppo_surrogate_loss,
    sample_step,
    sde_sigma,
    step_log_prob,
    step_mean,
    step_std,
)


def _sd3_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(10)
    return scheduler


def _flux_scheduler(num_steps=28, image_seq_len=1024):
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler


def _flow_grpo_mean_and_std(x, v, sigma, sigma_prev, sigma_max, noise_level):
    """Straight transcription of Flow-GRPO's ``sde_step_with_logprob`` mean / std (scalar sigmas)."""
    dt = sigma_prev - sigma
    denom_sigma = sigma_max if sigma == 1 else sigma
    std_dev_t = math.sqrt(sigma / (1 - denom_sigma)) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * math.sqrt(-dt)


# ---------------------------------------------------------------------------------------------------------------------
# ODE == diffusers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_scheduler", [_sd3_scheduler, _flux_scheduler], ids=["sd35", "flux"])
def test_ode_mean_matches_diffusers_euler(make_scheduler):
    scheduler = make_scheduler()
    sigmas = scheduler.sigmas
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for i, timestep in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=gen)
        ref = scheduler.step(v, timestep, x).prev_sample
        t, t_next = sigmas[i], sigmas[i + 1]
        for sampler in SAMPLERS:
            ours = step_mean(x, v, t, t_next, noise_level=0.0, sampler=sampler)
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        # python floats and (B,) tensors give the same step
        ours = step_mean(x, v, float(t), float(t_next))
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        ours = step_mean(x, v, t.repeat(2), t_next.repeat(2))
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        x_next, mean, std = sample_step(x, v, t, t_next)
        assert torch.equal(x_next, mean) and float(std) == 0.0
        x = ref


@pytest.mark.parametrize("sampler,a", [("sde", 0.7), ("cps", 0.5)])
def test_sample_step_noise_scale(sampler, a):
    gen = torch.Generator().manual_seed(7)
    x, v = torch.randn(2, 50000, generator=gen), torch.randn(2, 50000, generator=gen)
    t, t_next = torch.tensor([0.8, 0.4]), torch.tensor([0.7, 0.2])
    x_next, mean, std = sample_step(x, v, t, t_next, a, sampler, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(mean, step_mean(x, v, t, t_next, a, sampler))
    torch.testing.assert_close(std, step_std(t, t_next, a, sampler))
    # same generator seed -> same draw; explicit noise -> mean + std * noise
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    again, _, _ = sample_step(x, v, t, t_next, a, sampler, noise=noise)
    torch.testing.assert_close(x_next, again)
    torch.testing.assert_close(again, mean + std[:, None] * noise)
    # the empirical per-sample std of the draw is the transition std (SE of a std estimate ~ 1 / sqrt(2 n))
    empirical = (x_next - mean).std(dim=1)
    torch.testing.assert_close(empirical, std, rtol=4 / math.sqrt(2 * 50000), atol=0)


def test_outputs_are_float32_for_low_precision_inputs():
    x = torch.randn(2, 3, 4).bfloat16()
    v = torch.randn(2, 3, 4).bfloat16()
    for sampler in SAMPLERS:
        for a in (0.0, 0.7):
            mean = step_mean(x, v, 0.6, 0.5, a, sampler)
            assert mean.dtype == torch.float32
            torch.testing.assert_close(mean, step_mean(x.float(), v.float(), 0.6, 0.5, a, sampler))
            assert step_std(0.6, 0.5, a, sampler).dtype == torch.float32
            assert closed_form_kl(mean, x, 0.6, 0.5, a, sampler).dtype == torch.float32
    assert gaussian_log_prob(x, v, torch.tensor(0.5).half()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# SDE / CPS formulas
# ---------------------------------------------------------------------------------------------------------------------


def test_sde_mean_and_std_hand_checked_value():
    # x = 0.5, v = -0.3, t = 0.6, t_next = 0.5, a = 0.7:
    # sigma_t^2 = 0.49 * 0.6 / 0.4 = 0.735; dt = -0.1
    # mean = 0.5 * (1 - 0.735 * 0.1 / 1.2) + 0.03 * (1 + 0.735 * 0.4 / 1.2) = 0.469375 + 0.03735 = 0.506725
    x, v = torch.tensor([[0.5]]), torch.tensor([[-0.3]])
    mean = step_mean(x, v, 0.6, 0.5, noise_level=0.7, sampler="sde")
    assert mean.item() == pytest.approx(0.506725, abs=1e-6)
    assert sde_sigma(0.6, 0.7).item() == pytest.approx(math.sqrt(0.735), rel=1e-6)
    assert step_std(0.6, 0.5, 0.7, "sde").item() == pytest.approx(math.sqrt(0.735 * 0.1), rel=1e-6)


def test_cps_mean_and_std_hand_checked_value():
    # a = 0.5: sigma_c = 0.5 sin(pi / 4); x0_hat = 0.5 + 0.6 * 0.3 = 0.68; x1_hat = 0.5 - 0.4 * 0.3 = 0.38
    # mean = 0.5 * 0.68 + sqrt(0.25 - 0.125) * 0.38
    x, v = torch.tensor([[0.5]]), torch.tensor([[-0.3]])
    mean = step_mean(x, v, 0.6, 0.5, noise_level=0.5, sampler="cps")
    assert mean.item() == pytest.approx(0.34 + math.sqrt(0.125) * 0.38, abs=1e-6)
    assert step_std(0.6, 0.5, 0.5, "cps").item() == pytest.approx(0.5 * math.sin(math.pi / 4), rel=1e-6)
    # a = 1: the x1_hat coefficient vanishes, the mean is the (rescaled) x0 prediction, std = t_next
    mean = step_mean(x, v, 0.6, 0.5, noise_level=1.0, sampler="cps")
    assert mean.item() == pytest.approx(0.34, abs=1e-6)
    assert step_std(0.6, 0.5, 1.0, "cps").item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("make_scheduler", [_sd3_scheduler, _flux_scheduler], ids=["sd35", "flux"])
def test_sde_matches_flow_grpo_over_schedule(make_scheduler):
    sigmas = make_scheduler().sigmas
    sigma_max = sigmas[1].item()
    a = 0.7
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i].item(), sigmas[i + 1].item()
        for x, v in ((0.5, -0.3), (-1.2, 0.8)):
            ref_mean, ref_std = _flow_grpo_mean_and_std(x, v, t, t_next, sigma_max, a)
            mean = step_mean(torch.tensor([[x]]), torch.tensor([[v]]), t, t_next, a, "sde", t_guard=sigma_max)
            std = step_std(t, t_next, a, "sde", t_guard=sigma_max)
            assert mean.item() == pytest.approx(ref_mean, rel=1e-5, abs=1e-6)
            assert std.item() == pytest.approx(ref_std, rel=1e-5)
    # at t = 1 only the denominator is guarded: sigma_1 = a sqrt(1 / (1 - sigma_max))
    assert sde_sigma(1.0, a, t_guard=sigma_max).item() == pytest.approx(a / math.sqrt(1 - sigma_max), rel=1e-6)
    assert sde_sigma(1.0, a).item() == pytest.approx(a * 100.0, rel=1e-3)


def test_per_sample_sigmas_and_guard():
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 2, 5, generator=gen), torch.randn(3, 2, 5, generator=gen)
    t = torch.tensor([1.0, 0.7, 0.3])
    t_next = torch.tensor([0.9, 0.5, 0.0])
    guard = torch.tensor([0.95, 0.95, 0.95])
    for sampler in SAMPLERS:
        mean = step_mean(x, v, t, t_next, 0.8, sampler, t_guard=guard)
        std = step_std(t, t_next, 0.8, sampler, t_guard=guard)
        assert mean.shape == x.shape and std.shape == (3,)
        for i in range(3):
            mean_i = step_mean(x[i : i + 1], v[i : i + 1], t[i].item(), t_next[i].item(), 0.8, sampler, t_guard=0.95)
            torch.testing.assert_close(mean[i : i + 1], mean_i)
            assert std[i].item() == pytest.approx(step_std(t[i], t_next[i], 0.8, sampler, t_guard=0.95).item())


# ---------------------------------------------------------------------------------------------------------------------
# log-probs and KL
# ---------------------------------------------------------------------------------------------------------------------


def test_gaussian_log_prob_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    sample, mean = torch.randn(4, 3, 2, 5, generator=gen), torch.randn(4, 3, 2, 5, generator=gen)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0])
    ref = torch.distributions.Normal(mean, std.view(4, 1, 1, 1)).log_prob(sample)
    torch.testing.assert_close(gaussian_log_prob(sample, mean, std), ref.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(gaussian_log_prob(sample, mean, std, reduction="mean"), ref.mean(dim=(1, 2, 3)))
    ref = torch.distributions.Normal(mean, 0.3).log_prob(sample).sum(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(sample, mean, 0.3), ref)
    torch.testing.assert_close(gaussian_log_prob(sample, mean, torch.tensor(0.3)), ref)


@pytest.mark.parametrize("sampler,a", [("sde", 0.7), ("cps", 0.5)])
def test_closed_form_kl_matches_monte_carlo(sampler, a):
    gen = torch.Generator().manual_seed(3)
    n, t, t_next = 20000, 0.6, 0.5
    x = torch.randn(n, 4, 2, 2, generator=gen)
    v_student = torch.randn(x.shape, generator=gen)
    v_teacher = v_student + 0.5 * torch.randn(x.shape, generator=gen)
    mean_teacher = step_mean(x, v_teacher, t, t_next, a, sampler)
    sample, mean_student, std = sample_step(x, v_student, t, t_next, a, sampler, generator=gen)
    estimate = gaussian_log_prob(sample, mean_student, std) - gaussian_log_prob(sample, mean_teacher, std)
    kl = closed_form_kl(mean_student, mean_teacher, t, t_next, a, sampler, normalization="paper")
    assert kl.mean() > 0.1  # non-trivial KL, so the check has teeth
    diff = estimate - kl  # paired: only the sampling noise remains
    standard_error = diff.std() / math.sqrt(n)
    assert abs(diff.mean()) < 3 * standard_error, (diff.mean(), standard_error)
    # the estimator also recovers the absolute KL level
    assert abs(estimate.mean() - kl.mean()) / kl.mean() < 0.05


def test_kl_zero_for_equal_means_and_normalization_ratios():
    gen = torch.Generator().manual_seed(4)
    shape = (3, 4, 5, 6)
    d = 4 * 5 * 6
    mean_s, mean_t = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.tensor([1.0, 0.6, 0.2])
    t_next = torch.tensor([0.9, 0.45, 0.05])
    for sampler in SAMPLERS:
        for a in (0.0, 0.7):
            for norm in KL_NORMALIZATIONS:
                kl = closed_form_kl(mean_s, mean_s.clone(), t, t_next, a, sampler, norm, t_guard=0.95)
                assert torch.equal(kl, torch.zeros(3))
            paper = closed_form_kl(mean_s, mean_t, t, t_next, a, sampler, "paper", t_guard=0.95)
            reference = closed_form_kl(mean_s, mean_t, t, t_next, a, sampler, "reference", t_guard=0.95)
            if a == 0.0:
                expected = torch.full((3,), float(d))
                torch.testing.assert_close(paper, 0.5 * ((mean_s - mean_t) ** 2).sum(dim=(1, 2, 3)))
            elif sampler == "sde":
                expected = d / (t - t_next)
            else:
                expected = torch.full((3,), float(d))
            torch.testing.assert_close(paper / reference, expected, rtol=1e-5, atol=0)
    # paper normalization is the exact KL: hand-computed for one element
    kl = closed_form_kl(torch.tensor([[0.3]]), torch.tensor([[0.1]]), 0.6, 0.5, 0.7, "sde", "paper")
    assert kl.item() == pytest.approx(0.04 / (2 * 0.735 * 0.1), rel=1e-5)
    kl = closed_form_kl(torch.tensor([[0.3]]), torch.tensor([[0.1]]), 0.6, 0.5, 0.7, "sde", "reference")
    assert kl.item() == pytest.approx(0.04 / (2 * 0.735), rel=1e-5)


def test_kl_gradient_flows_through_both_means():
    mean_s = torch.tensor([[0.3, -0.2]], requires_grad=True)
    mean_t = torch.tensor([[0.1, 0.4]], requires_grad=True)
    closed_form_kl(mean_s, mean_t, 0.6, 0.5, 0.5, "cps", "paper").sum().backward()
    var = (0.5 * math.sin(math.pi / 4)) ** 2
    torch.testing.assert_close(mean_s.grad, torch.tensor([[0.2, -0.6]]) / var)
    torch.testing.assert_close(mean_t.grad, -mean_s.grad)


# ---------------------------------------------------------------------------------------------------------------------
# PPO-style surrogate
# ---------------------------------------------------------------------------------------------------------------------


def test_ppo_surrogate_gradient_is_unbiased_but_noisier():
    gen = torch.Generator().manual_seed(5)
    n, d, t, t_next, a = 20000, 4, 0.6, 0.5, 0.7
    weight = torch.randn(d, d, generator=gen) / math.sqrt(d)
    bias = torch.randn(d, generator=gen)
    teacher_weight = weight + 1.0 * torch.randn(d, d, generator=gen) / math.sqrt(d)
    teacher_bias = bias + 1.0 * torch.randn(d, generator=gen)
    x = torch.randn(n, d, generator=gen)  # a batch of random states
    eps = torch.randn(n, d, generator=gen)
    std = step_std(t, t_next, a, "sde")
    mean_teacher = step_mean(x, x @ teacher_weight.T + teacher_bias, t, t_next, a, "sde")

    def per_sample_grads(loss_fn):
        # one copy of the (shared) parameters per sample: d(sum of losses)/d(copy j) = per-sample gradient j
        w = weight.expand(n, d, d).clone().requires_grad_()
        b = bias.expand(n, d).clone().requires_grad_()
        mean_student = step_mean(x, torch.einsum("nij,nj->ni", w, x) + b, t, t_next, a, "sde")
        loss_fn(mean_student).sum().backward()
        return torch.cat([w.grad.reshape(n, -1), b.grad], dim=1).double()

    def ppo(mean_student):
        mean_old = mean_student.detach()
        sample = mean_old + std * eps
        return ppo_surrogate_loss(sample, mean_student, mean_old, mean_teacher, std)

    def closed_form(mean_student):
        return closed_form_kl(mean_student, mean_teacher, t, t_next, a, "sde", normalization="paper")

    g_ppo = per_sample_grads(ppo)
    g_kl = per_sample_grads(closed_form)
    kl = closed_form(step_mean(x, x @ weight.T + bias, t, t_next, a, "sde"))
    assert 0.1 < kl.mean() < 5.0

    diff = g_ppo - g_kl  # paired over the same states: only the sampling noise of a remains
    standard_error = diff.std(dim=0) / math.sqrt(n)
    z = diff.mean(dim=0) / standard_error
    assert z.abs().max() < 4.0, z
    cosine = torch.nn.functional.cosine_similarity(g_ppo.mean(dim=0), g_kl.mean(dim=0), dim=0)
    assert cosine > 0.99, cosine
    # the closed form varies only with the state, the sampled surrogate also with the transition noise
    variance_ratio = g_ppo.var(dim=0).sum() / g_kl.var(dim=0).sum()
    assert variance_ratio > 2.0, variance_ratio


def test_ppo_surrogate_values_and_clipping():
    std = 1.0
    sample = torch.tensor([[1.0]])
    log_norm = 0.5 * math.log(2 * math.pi)
    # on-policy: rho = 1 and loss = (log p_old - log p_T) + Delta = 2 Delta
    mean_s = torch.tensor([[0.0]], requires_grad=True)
    loss = ppo_surrogate_loss(sample, mean_s, mean_s.detach(), torch.tensor([[3.0]]), std)
    assert loss.item() == pytest.approx(2 * 1.5, rel=1e-6)  # Delta = -0.5 + 2 = 1.5
    loss.backward()
    assert mean_s.grad.item() == pytest.approx(1.0 * (1 + 1.5), rel=1e-6)  # score (a - mu) / std^2 = 1
    clipped_grad = torch.autograd.grad(
        ppo_surrogate_loss(sample, mean_s, mean_s.detach(), torch.tensor([[3.0]]), std, clip_range=0.2).sum(), mean_s
    )[0]
    assert clipped_grad.item() == pytest.approx(2.5, rel=1e-6)  # clipping is inactive on-policy

    # Delta is detached: a teacher that requires grad only gets the first term's gradient -(a - mu_T) / std^2
    mean_teacher = torch.tensor([[3.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(
        ppo_surrogate_loss(sample, mean_s, mean_s.detach(), mean_teacher, std).sum(), mean_teacher
    )
    assert grad.item() == pytest.approx(2.0, rel=1e-6)

    # the sampled transition is a constant (no reparameterised gradient through it)
    sample_rg = sample.clone().requires_grad_()
    loss = ppo_surrogate_loss(sample_rg, mean_s, mean_s.detach(), mean_teacher, std)
    assert torch.autograd.grad(loss.sum(), sample_rg, allow_unused=True)[0] is None

    # off-policy, rho = exp(0.375) > 1.2
    mean_old = torch.tensor([[0.0]])
    rho = math.exp(0.375)
    log_p_theta = -0.125 - log_norm
    for teacher, delta in ((3.0, 1.5), (1.0, -0.5)):
        log_p_teacher = -0.5 * (1.0 - teacher) ** 2 - log_norm
        mean_s = torch.tensor([[0.5]], requires_grad=True)
        for clip in (None, 0.2):
            loss = ppo_surrogate_loss(sample, mean_s, mean_old, torch.tensor([[teacher]]), std, clip_range=clip)
            (grad,) = torch.autograd.grad(loss.sum(), mean_s)
            score = 0.5  # (a - mu_theta) / std^2
            if clip is None or delta > 0:  # a cost above the clip range keeps its gradient (pessimistic max)
                expected_loss, expected_grad = rho * delta, score * (1 + rho * delta)
            else:
                expected_loss, expected_grad = 1.2 * delta, score
            assert loss.item() == pytest.approx(log_p_theta - log_p_teacher + expected_loss, rel=1e-6)
            assert grad.item() == pytest.approx(expected_grad, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("a", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("t,t_next,guard", [(1.0, 0.9, None), (1.0, 0.9, 0.95), (0.05, 0.0, None), (1.0, 0.0, None)])
def test_no_nan_or_inf_at_schedule_ends(sampler, a, t, t_next, guard):
    gen = torch.Generator().manual_seed(6)
    x, v, v_t = (torch.randn(2, 3, 4, generator=gen) for _ in range(3))
    v_s = v.clone().requires_grad_()
    mean_s = step_mean(x, v_s, t, t_next, a, sampler, t_guard=guard)
    mean_t = step_mean(x, v_t, t, t_next, a, sampler, t_guard=guard)
    std = step_std(t, t_next, a, sampler, t_guard=guard)
    x_next, _, _ = sample_step(x, v, t, t_next, a, sampler, t_guard=guard, generator=gen)
    assert torch.isfinite(mean_s).all() and torch.isfinite(std).all() and torch.isfinite(x_next).all()
    assert std >= 0
    for norm in KL_NORMALIZATIONS:
        kl = closed_form_kl(mean_s, mean_t, t, t_next, a, sampler, norm, t_guard=guard)
        assert torch.isfinite(kl).all() and (kl > 0).all()
        (grad,) = torch.autograd.grad(kl.sum(), v_s, retain_graph=True)
        assert torch.isfinite(grad).all()
    if (t_next == 0.0 and sampler == "cps") or a == 0.0:
        # deterministic step: x_next is the mean, the KL falls back to the ODE form
        assert float(std) == 0.0 and torch.equal(x_next, step_mean(x, v, t, t_next, a, sampler))
        kl = closed_form_kl(mean_s, mean_t, t, t_next, a, sampler, "paper")
        torch.testing.assert_close(kl, 0.5 * ((mean_s - mean_t) ** 2).sum(dim=(1, 2)))


def test_sde_sigma_guard_values():
    # without a guard t = 1 is clamped in the denominator only; with a guard, Flow-GRPO's sigma_max is used
    assert torch.isfinite(sde_sigma(torch.tensor([1.0, 0.5, 0.0]), 0.7)).all()
    assert sde_sigma(0.0, 0.7).item() == 0.0
    guarded = sde_sigma(torch.tensor([1.0, 0.5]), 0.7, t_guard=0.9)
    torch.testing.assert_close(guarded, torch.tensor([0.7 * math.sqrt(10.0), 0.7]))


def test_invalid_arguments_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sampler"):
        step_mean(x, x, 0.6, 0.5, 0.7, sampler="ddim")
    with pytest.raises(ValueError, match="sampler"):
        step_std(0.6, 0.5, 0.0, sampler="ddim")
    with pytest.raises(ValueError, match="noise_level"):
        step_mean(x, x, 0.6, 0.5, -0.1)
    with pytest.raises(ValueError, match="noise_level"):
        closed_form_kl(x, x, 0.6, 0.5, -0.1)
    with pytest.raises(ValueError, match="normalization"):
        closed_form_kl(x, x, 0.6, 0.5, 0.7, normalization="nats")
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, x, 1.0, reduction="max")
    with pytest.raises(ValueError, match="clip_range"):
        ppo_surrogate_loss(x, x, x, x, 1.0, clip_range=0.0)
    with pytest.raises(ValueError, match="sigma"):
        step_mean(x, x, torch.ones(2, 1), 0.5, 0.7)


# ---------------------------------------------------------------------------------------------- RL objectives


def test_group_advantages_by_hand():
    from trl_diffusion_opd.objectives import group_advantages

    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 6.0])
    # groups of 2: [1, 3] -> mean 2, std 1; [0, 0] -> 0; [2, 6] -> mean 4, std 2
    group = group_advantages(rewards, 2, "group")  # std + 1e-4, so an all-equal group gives 0
    expected = torch.tensor([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0, -2 / 2.0001, 2 / 2.0001])
    torch.testing.assert_close(group, expected)
    # global std of [1, 3, 0, 0, 2, 6]: mean 2, squared deviations 1, 1, 4, 4, 0, 16 -> sqrt(26 / 6)
    batch = group_advantages(rewards, 2, "batch", eps=0.0)
    std = math.sqrt(26 / 6)
    torch.testing.assert_close(batch, torch.tensor([-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]) / std)
    torch.testing.assert_close(
        group_advantages(rewards, 2, "none", clip=1.5), torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.5, 1.5])
    )


def test_grpo_guard_ratio_is_one_when_the_policy_has_not_moved_and_by_hand_otherwise():
    from trl_diffusion_opd.objectives import grpo_guard_log_ratio, grpo_guard_step_weight, ppo_clip_loss

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 2, 2, generator=g)
    sample = mean + 0.3 * torch.randn(2, 3, 2, 2, generator=g)
    lp = gaussian_log_prob(sample, mean, 0.3, "mean")
    assert torch.equal(grpo_guard_log_ratio(lp, lp, mean, mean.clone(), 0.3), torch.zeros(2))
    # moved: the normalised log-ratio is <x' - mu_old, mu_theta - mu_old> / (D sigma)
    moved = mean + 0.01
    lp_new = gaussian_log_prob(sample, moved, 0.3, "mean")
    expected = ((sample - mean) * 0.01).flatten(1).mean(1) / 0.3
    torch.testing.assert_close(grpo_guard_log_ratio(lp_new, lp, moved, mean, 0.3), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grpo_guard_step_weight(torch.tensor([0.8]), torch.tensor([0.6])), torch.tensor([5.0]))
    # PPO clip by hand: ratio e^0.2 ~ 1.2214, eps 0.1 -> clipped at 1.1
    log_ratio = torch.tensor([0.2, 0.2, -0.2])
    adv = torch.tensor([1.0, -1.0, 1.0])
    r = math.exp(0.2)
    expected = torch.tensor([max(-r, -1.1), max(r, 1.1), max(-1 / r, -0.9)])
    torch.testing.assert_close(ppo_clip_loss(log_ratio, adv, 0.1), expected)


def test_nft_optimality_and_heun_by_hand():
    from trl_diffusion_opd.objectives import nft_optimality
    from trl_diffusion_opd.transition import heun_mean

    torch.testing.assert_close(
        nft_optimality(torch.tensor([-10.0, -2.5, 0.0, 5.0]), 5.0), torch.tensor([0, 0.25, 0.5, 1])
    )
    x = torch.ones(1, 2)
    # dt = -0.5; x + dt * (v + v_next) / 2 = 1 - 0.5 * 3 = -0.5
    torch.testing.assert_close(heun_mean(x, 2 * x, 4 * x, 1.0, 0.5), torch.full((1, 2), -0.5))


# ---------------------------------------------------------------------------------- CPS: last step, conventions


def _flow_grpo_cps_step(x, v, sigma, sigma_prev, a, prev_sample):
    """Flow-GRPO's `sde_step_with_logprob(..., sde_type="cps")` (yifan123/flow_grpo), written out as published."""
    std_dev_t = sigma_prev * math.sin(a * math.pi / 2)
    pred_original_sample = x - sigma * v
    noise_estimate = x + v * (1 - sigma)
    prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * math.sqrt(
        sigma_prev**2 - std_dev_t**2
    )
    log_prob = -((prev_sample - prev_sample_mean) ** 2)  # "remove all constants"
    return prev_sample_mean, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), std_dev_t


def test_cps_last_step_is_deterministic_and_its_log_probs_are_finite():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    x_next, mean, std = sample_step(x, v, 0.3, 0.0, 0.7, "cps", generator=g)
    assert float(std) == 0.0 and torch.equal(x_next, mean)
    moved = (mean + 0.05 * torch.randn(mean.shape, generator=g)).requires_grad_()
    for reduction in LOG_PROB_REDUCTIONS:
        # no density: 0 for every sample, with a finite (zero) gradient; it used to be nan
        value = gaussian_log_prob(x_next, moved, std, reduction)
        assert torch.equal(value, torch.zeros(3))
        (grad,) = torch.autograd.grad(value.sum(), moved)
        assert torch.equal(grad, torch.zeros_like(grad))
    # a (B,) std with one deterministic row leaves the other rows' exact density untouched
    stds = torch.tensor([0.0, 0.2, 0.5])
    mixed = gaussian_log_prob(x_next, moved.detach(), stds)
    assert mixed[0] == 0.0
    torch.testing.assert_close(mixed[1:], gaussian_log_prob(x_next[1:], moved.detach()[1:], stds[1:]))
    # Flow-GRPO's convention: 0 at the rollout (x' = mu), -mean((x' - mu_theta)^2) for a moved policy, finite
    assert torch.equal(step_log_prob(x_next, mean, std, "cps", "flow_grpo"), torch.zeros(3))
    ref_mean, ref_lp, _ = _flow_grpo_cps_step(x, v, 0.3, 0.0, 0.7, x_next)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(step_log_prob(x_next, mean, std, "cps"), ref_lp, rtol=0, atol=1e-7)
    moved_lp = step_log_prob(x_next, moved.detach(), std, "cps", "flow_grpo")
    torch.testing.assert_close(moved_lp, -((x_next - moved.detach()) ** 2).flatten(1).mean(1))
    assert torch.isfinite(moved_lp).all() and (moved_lp < 0).all()


@pytest.mark.parametrize("a", [0.3, 0.7])
def test_cps_log_prob_conventions_against_the_formulas(a):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t, t_next = 0.7, 0.45
    x_next, mean, std = sample_step(x, v, t, t_next, a, "cps", generator=g)
    ref_mean, ref_lp, ref_std = _flow_grpo_cps_step(x, v, t, t_next, a, x_next)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-6)
    assert float(std) == pytest.approx(ref_std, rel=1e-6)
    # default: Flow-GRPO's value, bit for bit the published formula
    torch.testing.assert_close(step_log_prob(x_next, mean, std, "cps"), ref_lp, rtol=1e-6, atol=0)
    torch.testing.assert_close(flow_grpo_cps_log_prob(x_next, mean), ref_lp, rtol=1e-6, atol=0)
    # "gaussian": the exact density per element, -(x' - mu)^2 / (2 s^2) - log s - log(2 pi) / 2
    exact = (-((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close(step_log_prob(x_next, mean, std, "cps", "gaussian"), exact)
    # PPO log-ratios: exact = Flow-GRPO's / (2 sigma_c^2)
    moved = mean + 0.02 * torch.randn(mean.shape, generator=g)
    ratio_fg = step_log_prob(x_next, moved, std, "cps") - step_log_prob(x_next, mean, std, "cps")
    ratio_exact = step_log_prob(x_next, moved, std, "cps", "gaussian") - step_log_prob(
        x_next, mean, std, "cps", "gaussian"
    )
    torch.testing.assert_close(ratio_exact, ratio_fg / (2 * std**2), rtol=1e-4, atol=1e-7)
    # the SDE has one convention, the per-element mean of the density (Flow-GRPO's too)
    x_next, mean, std = sample_step(x, v, t, t_next, a, "sde", generator=g)
    for convention in CPS_LOG_PROBS:
        assert torch.equal(
            step_log_prob(x_next, mean, std, "sde", convention), gaussian_log_prob(x_next, mean, std, "mean")
        )
    with pytest.raises(ValueError, match="cps_log_prob"):
        step_log_prob(x_next, mean, std, "cps", "exact")


# ---------------------------------------------------------------------------------- GRPO-Guard bias, advantages


def _released_ratio_norm(log_prob, old_log_prob, mean, old_mean, sigma_bar):
    """The RatioNorm block of GRPO-Guard's `train_sd3_GRPO_Guard.py` (sqrt_dt.mean() * sigma_t = sigma_bar)."""
    ratio_mean_bias = (mean - old_mean).pow(2).mean(dim=tuple(range(1, log_prob.ndim)))  # ndim 1: dim=() = all
    ratio_mean_bias = ratio_mean_bias / (2 * sigma_bar**2)
    return (log_prob - old_log_prob + ratio_mean_bias) * sigma_bar


def _guard_inputs(batch, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(batch, 3, 2, 2, generator=g)
    sample = old + std * torch.randn(old.shape, generator=g)
    moved = old + 0.05 * torch.randn(old.shape, generator=g)  # a different shift per row
    lp_old = gaussian_log_prob(sample, old, std, "mean")
    lp_new = gaussian_log_prob(sample, moved, std, "mean")
    return sample, old, moved, lp_old, lp_new


def test_grpo_guard_bias_sample_and_batch_against_their_formulas():
    from trl_diffusion_opd.objectives import grpo_guard_log_ratio

    std = 0.3
    sample, old, moved, lp_old, lp_new = _guard_inputs(4, 0, std)
    per_sample = grpo_guard_log_ratio(lp_new, lp_old, moved, old, std, "sample")
    batch = grpo_guard_log_ratio(lp_new, lp_old, moved, old, std, "batch")
    # "sample" is the paper's closed form <x' - mu_old, mu_theta - mu_old> / (D sigma_bar)
    closed = ((sample - old) * (moved - old)).flatten(1).mean(1) / std
    torch.testing.assert_close(per_sample, closed, rtol=1e-4, atol=1e-6)
    # "batch" is the released code, literally
    torch.testing.assert_close(batch, _released_ratio_norm(lp_new, lp_old, moved, old, std), rtol=1e-5, atol=1e-7)
    # and they differ by sigma_bar (b_bar - b_i), b_i = ||mu_theta - mu_old||^2 / (2 D sigma_bar^2)
    b = (moved - old).pow(2).flatten(1).mean(1) / (2 * std**2)
    torch.testing.assert_close(batch - per_sample, std * (b.mean() - b), rtol=1e-4, atol=1e-7)
    assert (batch - per_sample).abs().max() > 1e-4  # a real difference here
    # a batch of one: identical
    one = [t[:1] for t in (lp_new, lp_old, moved, old)]
    assert torch.equal(grpo_guard_log_ratio(*one, std, "sample"), grpo_guard_log_ratio(*one, std, "batch"))
    # two trained steps in one call (step-major rows): the batch mean is taken within each step
    stds = torch.tensor([0.3] * 4 + [0.1] * 4)
    sample2, old2, moved2, _, _ = _guard_inputs(4, 1, 0.1)
    rows = [torch.cat(pair) for pair in ((sample, sample2), (old, old2), (moved, moved2))]
    lp_o = gaussian_log_prob(rows[0], rows[1], stds, "mean")
    lp_n = gaussian_log_prob(rows[0], rows[2], stds, "mean")
    both = grpo_guard_log_ratio(lp_n, lp_o, rows[2], rows[1], stds, "batch", num_groups=2)
    first = _released_ratio_norm(lp_n[:4], lp_o[:4], rows[2][:4], rows[1][:4], 0.3)
    second = _released_ratio_norm(lp_n[4:], lp_o[4:], rows[2][4:], rows[1][4:], 0.1)
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="num_groups"):
        grpo_guard_log_ratio(lp_n, lp_o, rows[2], rows[1], stds, "batch", num_groups=3)
    with pytest.raises(ValueError, match="bias"):
        grpo_guard_log_ratio(lp_n, lp_o, rows[2], rows[1], stds, "mean")


def test_grpo_guard_log_ratio_is_zero_on_a_deterministic_step():
    from trl_diffusion_opd.objectives import grpo_guard_log_ratio

    old = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    moved = (old + 0.1).requires_grad_()
    zero = torch.zeros(2)
    for bias in ("sample", "batch"):
        value = grpo_guard_log_ratio(zero, zero, moved, old, torch.zeros(2), bias)
        assert torch.equal(value, torch.zeros(2))  # was nan (0 * inf)
        (grad,) = torch.autograd.grad(value.sum(), moved)
        assert torch.isfinite(grad).all()


def test_constant_groups_get_exactly_zero_advantages():
    from trl_diffusion_opd.objectives import group_advantages, zero_std_groups

    # float32's mean of 24 x 0.7 is 0.7 + 6e-8, which used to give advantages of -6e-4 (0.7) / +6e-4 (0.9)
    for value in (0.7, 0.9, 0.1, 1 / 3):
        rewards = torch.full((24,), value)
        for scale in ("group", "batch", "none"):
            assert torch.equal(group_advantages(rewards, 24, scale), torch.zeros(24)), (value, scale)
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.2, 0.5, 0.9])
    assert zero_std_groups(rewards, 3).tolist() == [True, False]
    adv = group_advantages(rewards, 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    group = rewards[3:].double()
    expected = (group - group.mean()) / (group.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv[3:], expected.float(), rtol=0, atol=0)
