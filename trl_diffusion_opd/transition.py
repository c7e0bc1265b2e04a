"""Gaussian transitions of rectified-flow samplers, and the per-step losses built on them.

Pure float32 torch math, no pipeline objects. Conventions used throughout:

* latents ``x`` have shape ``(B, *D)`` (any number of trailing dims); ``D`` below also denotes the number of latent
  elements per sample, ``prod(x.shape[1:])``;
* sigmas ``t`` (current) and ``t_next`` (next) are python floats, scalar tensors or ``(B,)`` tensors, in ``[0, 1]``;
  time runs from ``t = 1`` (pure noise) to ``t = 0`` (data), so ``dt = t_next - t < 0``;
* ``v`` is the velocity predicted by the model (same shape as ``x``), with ``x_t = (1 - t) x_0 + t x_1``,
  ``v = x_1 - x_0``;
* every result is float32 whatever the input dtype.

Samplers: ``noise_level == 0`` is the deterministic Euler ODE step (any sampler); ``"sde"`` is Flow-GRPO's
Euler-Maruyama discretisation of the marginal-preserving SDE; ``"cps"`` is coefficient-preserving sampling. CPS's
std ``t_next sin(a pi / 2)`` is 0 on the step into ``t = 0``: that last transition is deterministic (see
``gaussian_log_prob`` and ``closed_form_kl`` for how each quantity treats it).

Log-probability conventions (``step_log_prob``): the true Gaussian log-density ``gaussian_log_prob`` (nats, summed
or averaged over latent elements), and Flow-GRPO's ``sde_step_with_logprob``, which returns for ``"sde"`` the
per-element *mean* of the true log-density (constants included) but for ``"cps"`` only ``-mean((x' - mu)^2)``
(no ``1 / (2 sigma^2)``, no constants). PPO log-ratios of the two CPS conventions differ by the factor
``1 / (2 sigma_c^2)``, so clip ranges published for one do not transfer to the other.
"""

import math

import torch


SAMPLERS = ("sde", "cps")
KL_NORMALIZATIONS = ("paper", "reference")
LOG_PROB_REDUCTIONS = ("sum", "mean")
CPS_LOG_PROBS = ("flow_grpo", "gaussian")

# Used for ``t >= 1`` inside the SDE sigma when the caller gives no ``t_guard`` (keeps sigma finite).
_DEFAULT_T_CLAMP = 1.0 - 1e-4
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _as_tensor(value, device=None) -> torch.Tensor:
    """Python float / tensor -> float32 tensor (on ``device`` when given)."""
    if isinstance(value, torch.Tensor):
        value = value.float()
        return value if device is None else value.to(device)
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _expand(t, like: torch.Tensor) -> torch.Tensor:
    """Reshape a float, scalar tensor or ``(B,)`` tensor to ``(B, 1, 1, ...)`` so it broadcasts against ``like``.

    Returns a float32 tensor on ``like``'s device, except that a Python number or a 0-dim CPU tensor stays a host
    scalar: torch applies a 0-dim CPU tensor to tensors on any device as a plain scalar, whereas creating or copying
    it on an accelerator is a blocking host-to-device copy (two to four per sampler step).
    """
    host = isinstance(t, (int, float)) or (isinstance(t, torch.Tensor) and t.dim() == 0 and t.device.type == "cpu")
    t = _as_tensor(t, None if host else like.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1:
        raise ValueError(f"sigma must be a float, a scalar tensor or a (B,) tensor, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def _check_args(noise_level, sampler: str) -> float:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    noise_level = float(noise_level)
    if not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level}")
    return noise_level


def _guarded_t(t: torch.Tensor, t_guard) -> torch.Tensor:
    """``t`` with entries ``>= 1`` replaced by ``t_guard`` (or by ``1 - 1e-4`` when ``t_guard`` is None)."""
    guard = _DEFAULT_T_CLAMP if t_guard is None else t_guard
    guard = _as_tensor(guard, t.device)
    return torch.where(t >= 1.0, guard, t)


def _sde_coef(t: torch.Tensor, noise_level: float, t_guard) -> torch.Tensor:
    """``sigma_t**2 / (2 t) = a**2 / (2 (1 - t'))``, with t' the guarded t.

    The simplified form is algebraically what Flow-GRPO computes, but stays finite at ``t = 0``.
    """
    return noise_level**2 / (2.0 * (1.0 - _guarded_t(t, t_guard)))


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum or average over all non-batch dims: ``(B, *D) -> (B,)``."""
    dims = tuple(range(1, values.dim()))
    if reduction == "sum":
        return values.sum(dim=dims) if dims else values
    if reduction == "mean":
        return values.mean(dim=dims) if dims else values
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {LOG_PROB_REDUCTIONS}")


# --------------------------------------------------------------------------------------------------------------------
# transitions
# --------------------------------------------------------------------------------------------------------------------


def sde_sigma(t, noise_level: float, t_guard=None) -> torch.Tensor:
    """Diffusion coefficient of Flow-GRPO's SDE, ``sigma_t = a * sqrt(t / (1 - t))``.

    It is infinite at ``t = 1``; like Flow-GRPO (``sde_step_with_logprob``), only the *denominator* then uses the
    guard: ``sigma_t = a * sqrt(t / (1 - where(t >= 1, t_guard, t)))``, where callers should pass ``t_guard`` = the
    first schedule sigma below 1 (Flow-GRPO's ``sigmas[1]``). Without ``t_guard``, ``t >= 1`` is clamped to
    ``1 - 1e-4`` in the denominator, so the result is always finite.

    Args:
        t: current sigma, float / scalar tensor / ``(B,)`` tensor, in ``[0, 1]``.
        noise_level: ``a >= 0`` (dimensionless).
        t_guard: float or tensor broadcastable to ``t``; the first schedule sigma ``< 1``.

    Returns:
        float32 tensor with ``t``'s shape (per unit sqrt-time).
    """
    t = _as_tensor(t)
    denom = 1.0 - _guarded_t(t, t_guard)
    return float(noise_level) * torch.sqrt(t.clamp_min(0.0) / denom)


def _ode_mean(x: torch.Tensor, v: torch.Tensor, t, t_next) -> torch.Tensor:
    dt = _expand(t_next, x) - _expand(t, x)
    return x + dt * v


def step_mean(
    x: torch.Tensor,
    v: torch.Tensor,
    t,
    t_next,
    noise_level: float = 0.0,
    sampler: str = "sde",
    t_guard=None,
) -> torch.Tensor:
    """Mean of the sampler's Gaussian transition ``p(x_{t_next} | x_t)``.

    * ``noise_level == 0`` (any sampler): Euler ODE step ``x + dt * v`` (identical to diffusers'
      ``FlowMatchEulerDiscreteScheduler.step``).
    * ``"sde"`` (Flow-GRPO): ``x (1 + sigma_t^2 dt / (2t)) + v (1 + sigma_t^2 (1 - t) / (2t)) dt`` with
      ``sigma_t = sde_sigma(t, noise_level, t_guard)``; the guard only enters ``sigma_t``, the formula uses the true t.
    * ``"cps"``: ``(1 - t_next) x0_hat + sqrt(t_next^2 - sigma_c^2) x1_hat`` with ``x0_hat = x - t v``,
      ``x1_hat = x + (1 - t) v`` and ``sigma_c = t_next sin(a pi / 2)``.

    Args:
        x: latents ``(B, *D)``.
        v: predicted velocity ``(B, *D)``.
        t, t_next: current / next sigma (float, scalar or ``(B,)``), ``t_next < t``.
        noise_level: ``a >= 0``.
        sampler: one of ``SAMPLERS``.
        t_guard: first schedule sigma ``< 1`` (see ``sde_sigma``); only used by ``"sde"``.

    Returns:
        float32 tensor ``(B, *D)``, in latent units.
    """
    noise_level = _check_args(noise_level, sampler)
    x, v = x.float(), v.float()
    if noise_level == 0.0:
        return _ode_mean(x, v, t, t_next)
    t_b, t_next_b = _expand(t, x), _expand(t_next, x)
    dt = t_next_b - t_b
    if sampler == "sde":
        guard = None if t_guard is None else _expand(t_guard, x)
        coef = _sde_coef(t_b, noise_level, guard)  # sigma_t^2 / (2 t)
        return x * (1.0 + coef * dt) + v * (1.0 + coef * (1.0 - t_b)) * dt
    # cps
    sigma_c = t_next_b * math.sin(noise_level * math.pi / 2.0)
    x0_hat = x - t_b * v
    x1_hat = x + (1.0 - t_b) * v
    # clamp: rounding can make t_next^2 - sigma_c^2 slightly negative when sin(...) == 1
    return (1.0 - t_next_b) * x0_hat + torch.sqrt((t_next_b**2 - sigma_c**2).clamp_min(0.0)) * x1_hat


def step_std(t, t_next, noise_level: float = 0.0, sampler: str = "sde", t_guard=None) -> torch.Tensor:
    """Standard deviation of the sampler's (isotropic) Gaussian transition.

    ODE (``noise_level == 0``): 0; ``"sde"``: ``sigma_t * sqrt(-dt)``; ``"cps"``: ``sigma_c = t_next sin(a pi / 2)``.

    Args:
        t, t_next: current / next sigma (float, scalar or ``(B,)``).
        noise_level, sampler, t_guard: as in ``step_mean``.

    Returns:
        float32 tensor of the broadcast shape of ``t`` and ``t_next`` (``()`` or ``(B,)``), in latent units.
    """
    noise_level = _check_args(noise_level, sampler)
    device = next((a.device for a in (t, t_next) if isinstance(a, torch.Tensor)), None)
    t, t_next = _as_tensor(t, device), _as_tensor(t_next, device)
    t, t_next = torch.broadcast_tensors(t, t_next)
    if noise_level == 0.0:
        return torch.zeros_like(t)
    if sampler == "sde":
        # clamp: t_next > t is not a valid step, keep sqrt real anyway
        return sde_sigma(t, noise_level, t_guard) * torch.sqrt((t - t_next).clamp_min(0.0))
    return t_next * math.sin(noise_level * math.pi / 2.0)


def sample_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t,
    t_next,
    noise_level: float = 0.0,
    sampler: str = "sde",
    t_guard=None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``x_next = mean + std * eps``, ``eps ~ N(0, I)``.

    Args:
        x, v, t, t_next, noise_level, sampler, t_guard: as in ``step_mean``.
        generator: torch generator for ``eps`` (ignored when ``noise`` is given).
        noise: optional pre-drawn ``eps`` of shape ``(B, *D)``.

    Returns:
        ``(x_next, mean, std)``: float32 ``(B, *D)``, ``(B, *D)`` and ``()`` / ``(B,)``. For the ODE
        ``x_next = mean`` exactly and ``std = 0``.
    """
    mean = step_mean(x, v, t, t_next, noise_level, sampler, t_guard)
    std = step_std(t, t_next, noise_level, sampler, t_guard)
    if std.dim():  # a 0-dim std (float sigmas) stays a host scalar, which needs no copy to the device
        std = std.to(mean.device)
    if float(noise_level) == 0.0:
        return mean.clone(), mean, std
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    x_next = mean + _expand(std, mean) * noise.float()
    return x_next, mean, std


# --------------------------------------------------------------------------------------------------------------------
# densities and losses
# --------------------------------------------------------------------------------------------------------------------


def gaussian_log_prob(
    sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduction: str = "sum"
) -> torch.Tensor:
    """Log-density of ``N(mean, std^2 I)`` at ``sample``, reduced over the non-batch dims.

    ``log p = sum_i [-(x'_i - mu_i)^2 / (2 std^2) - log std - log(2 pi) / 2]`` (``"sum"``) or the same averaged over
    the ``D`` latent elements (``"mean"``, which for the ``"sde"`` sampler is what Flow-GRPO's
    ``sde_step_with_logprob`` returns; its ``"cps"`` value is another quantity, see ``flow_grpo_cps_log_prob``).

    A row whose ``std`` is 0 (CPS's last step into ``t = 0``) is a deterministic transition, which has no density:
    its log-prob is defined as 0 for every sample (value and gradient), so a log-ratio of such a step is 0 and the
    step carries no policy gradient. That is also what Flow-GRPO's rollout stores there (``x' = mu``).

    Args:
        sample, mean: ``(B, *D)``.
        std: ``>= 0``; float, scalar, ``(B,)`` or a tensor already broadcastable to ``sample`` (latent units).
        reduction: ``"sum"`` (the true log-density, nats) or ``"mean"`` (nats per latent element).

    Returns:
        float32 ``(B,)``.
    """
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {LOG_PROB_REDUCTIONS}")
    sample, mean = sample.float(), mean.float()
    std = _as_tensor(std, sample.device)
    if std.dim() <= 1:
        std = _expand(std, sample)
    deterministic = std == 0
    # a safe std keeps the value and the gradient of the masked rows finite (0 * inf would be nan)
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    log_prob = -((sample - mean) ** 2) / (2.0 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    log_prob = torch.where(deterministic, torch.zeros_like(log_prob), log_prob)
    return _reduce(log_prob.expand_as(sample), reduction)


def flow_grpo_cps_log_prob(sample: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's "log_prob" of a CPS transition: ``-(x'_i - mu_i)^2`` averaged over the ``D`` latent elements.

    This is Flow-GRPO's ``sde_step_with_logprob(..., sde_type="cps")`` ("remove all constants"): neither the
    ``1 / (2 sigma_c^2)`` factor nor the normalising constants of the Gaussian, so it is *not* a log-density. A PPO
    log-ratio built on it equals ``2 sigma_c^2`` times the exact per-element log-ratio (``gaussian_log_prob(...,
    "mean")``), whence Flow-GRPO's CPS clip ranges only transfer with this convention. It is finite on the
    deterministic last step (``sigma_c = 0``), where the rollout's own value is 0.

    Args:
        sample, mean: ``(B, *D)``.

    Returns:
        float32 ``(B,)``, in squared latent units (no nats).
    """
    return -_reduce((sample.float() - mean.float()) ** 2, "mean")


def step_log_prob(
    sample: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor | float,
    sampler: str = "sde",
    cps_log_prob: str = "flow_grpo",
) -> torch.Tensor:
    """Per-element log-probability of a sampled transition, in the convention a PPO ratio is built on.

    * ``"sde"`` (either ``cps_log_prob``): ``gaussian_log_prob(sample, mean, std, "mean")``, which is also Flow-GRPO's
      value.
    * ``"cps"`` with ``cps_log_prob="flow_grpo"`` (default, so that Flow-GRPO's CPS hyper-parameters transfer):
      ``flow_grpo_cps_log_prob(sample, mean) = -mean((x' - mu)^2)``.
    * ``"cps"`` with ``cps_log_prob="gaussian"``: the exact per-element log-density
      ``gaussian_log_prob(sample, mean, std, "mean")``; log-ratios are ``1 / (2 sigma_c^2)`` times the Flow-GRPO ones.

    Args:
        sample, mean: ``(B, *D)``.
        std: transition std (``step_std``), float / scalar / ``(B,)``.
        sampler: one of ``SAMPLERS``.
        cps_log_prob: one of ``CPS_LOG_PROBS``.

    Returns:
        float32 ``(B,)``: nats per latent element, or squared latent units for CPS's ``"flow_grpo"``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if cps_log_prob not in CPS_LOG_PROBS:
        raise ValueError(f"unknown cps_log_prob {cps_log_prob!r}; expected one of {CPS_LOG_PROBS}")
    if sampler == "cps" and cps_log_prob == "flow_grpo":
        return flow_grpo_cps_log_prob(sample, mean)
    return gaussian_log_prob(sample, mean, std, "mean")


def closed_form_kl(
    mean_student: torch.Tensor,
    mean_teacher: torch.Tensor,
    t,
    t_next,
    noise_level: float = 0.0,
    sampler: str = "sde",
    normalization: str = "reference",
    t_guard=None,
) -> torch.Tensor:
    """Per-step reverse KL(p_S || p_T) between the student's and teacher's Gaussian transitions.

    Both transitions share the covariance ``std^2 I`` (it depends only on the schedule), so the KL is a scaled squared
    distance between the means:

    * ``"paper"`` (DiffusionOPD Eq. 11, the exact KL in nats): ``||mu_S - mu_T||^2 / (2 std^2)`` summed over the
      ``D`` latent elements, ``std = step_std(...)``.
    * ``"reference"`` (the released DiffusionOPD / Flow-GRPO code, so published hyper-parameters transfer): the
      *mean* over latent elements of ``(mu_S - mu_T)^2 / (2 s^2)``, with ``s = sigma_t`` (no ``-dt`` factor) for
      ``"sde"`` and ``s = sigma_c`` for ``"cps"``. Hence paper / reference = ``D / (-dt)`` (sde) and ``D`` (cps).
    * ODE (``noise_level == 0``) and any sample whose variance is 0 (e.g. cps's last step ``t_next = 0``, which is
      deterministic): ``0.5 ||mu_S - mu_T||^2``, summed (``"paper"``) or averaged (``"reference"``).

    Gradients flow through both means; detach the teacher at the call site if wanted.

    Args:
        mean_student, mean_teacher: transition means ``(B, *D)`` (``step_mean``).
        t, t_next, noise_level, sampler, t_guard: as in ``step_mean``.
        normalization: one of ``KL_NORMALIZATIONS``.

    Returns:
        float32 ``(B,)``, in nats (``"paper"``) or nats per latent element up to the ``-dt`` factor (``"reference"``).
    """
    noise_level = _check_args(noise_level, sampler)
    if normalization not in KL_NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {KL_NORMALIZATIONS}")
    reduction = "sum" if normalization == "paper" else "mean"
    sq = _reduce((mean_student.float() - mean_teacher.float()) ** 2, reduction)
    if noise_level == 0.0:
        return 0.5 * sq
    if normalization == "paper":
        var = step_std(t, t_next, noise_level, sampler, t_guard) ** 2
    elif sampler == "sde":
        var = sde_sigma(t, noise_level, t_guard) ** 2
    else:
        var = step_std(t, t_next, noise_level, sampler, t_guard) ** 2
    var = var.to(sq.device).expand_as(sq)
    positive = var > 0
    # safe denominator keeps both the value and the gradient finite in the deterministic (var == 0) branch
    safe_var = torch.where(positive, var, torch.ones_like(var))
    return torch.where(positive, sq / (2.0 * safe_var), 0.5 * sq)


def velocity_mse(velocity_student: torch.Tensor, velocity_teacher: torch.Tensor) -> torch.Tensor:
    """Single-query supervision (DanceOPD): the mean over latent elements of ``(v_S - v_T)^2`` per row.

    Every sampler's transition mean is affine in the velocity, so at one state the student's and teacher's means
    differ by a per-state multiple of ``v_S - v_T``: this is the per-step KL up to that state's scale.

    Returns:
        float32 ``(B,)``.
    """
    return _reduce((velocity_student.float() - velocity_teacher.float()) ** 2, "mean")


def ppo_surrogate_loss(
    sample: torch.Tensor,
    mean_student: torch.Tensor,
    mean_old: torch.Tensor,
    mean_teacher: torch.Tensor,
    std: torch.Tensor | float,
    clip_range: float | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """PPO-style sampled surrogate of the per-step reverse KL (the paper's ablation of the closed form).

    With ``a`` the transition sampled from the rollout policy ``pi_old`` (treated as a constant),
    ``Delta = log pi_old(a) - log pi_T(a)`` (single-sample KL estimate, a dense cost, detached) and
    ``rho = exp(log pi_theta(a) - log pi_old(a))``::

        loss = [log pi_theta(a) - log pi_T(a)] + rho * Delta

    and with ``clip_range`` eps the second term becomes ``max(rho Delta, clip(rho, 1 - eps, 1 + eps) Delta)``
    (pessimistic bound for a cost).

    Why it estimates the KL gradient: ``KL(pi_theta || pi_T) = E_{a ~ pi_theta}[log pi_theta(a) - log pi_T(a)]``, so
    ``grad KL = E[grad log pi_theta(a) (log pi_theta(a) - log pi_T(a))] + E[grad log pi_theta(a)]`` (score-function
    identity; ``a`` does not depend on theta). On-policy (``pi_theta == pi_old`` numerically, ``rho = 1``,
    ``grad rho = grad log pi_theta``) the loss gradient is ``grad log pi_theta(a) + Delta grad log pi_theta(a)``: the
    first ("pathwise") term has zero mean, the second is the unbiased score-function estimator. Its expectation over
    ``a ~ pi_old`` therefore equals the gradient of ``closed_form_kl(..., normalization="paper")`` (exact only with
    ``reduction="sum"``, the true log-density; ``"mean"`` scales everything by ``1 / D``), at a much larger variance.

    Args:
        sample: sampled transition ``a`` ``(B, *D)``.
        mean_student: ``mu_theta`` ``(B, *D)``, carries the gradient.
        mean_old: rollout-policy mean ``(B, *D)`` (detached here).
        mean_teacher: teacher mean ``(B, *D)`` (detached inside ``Delta``, not in the first term).
        std: shared transition std (``step_std``), float / scalar / ``(B,)``, ``> 0``.
        clip_range: PPO ``eps`` or None for no clipping.
        reduction: ``"sum"`` or ``"mean"``, passed to ``gaussian_log_prob``.

    Returns:
        float32 ``(B,)`` loss per sample.
    """
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")
    sample = sample.detach()
    if isinstance(std, torch.Tensor):
        std = std.detach()
    log_p_theta = gaussian_log_prob(sample, mean_student, std, reduction)
    log_p_old = gaussian_log_prob(sample, mean_old.detach(), std, reduction)
    log_p_teacher = gaussian_log_prob(sample, mean_teacher, std, reduction)
    delta = (log_p_old - log_p_teacher).detach()
    ratio = torch.exp(log_p_theta - log_p_old)
    surrogate = ratio * delta
    if clip_range is not None:
        surrogate = torch.maximum(surrogate, ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * delta)
    return (log_p_theta - log_p_teacher) + surrogate


def heun_mean(x: torch.Tensor, v: torch.Tensor, v_next: torch.Tensor, t, t_next) -> torch.Tensor:
    """Second-order (Heun) ODE step ``x + dt (v + v_next) / 2``, where ``v_next`` is the velocity at the Euler
    predictor ``x + dt v`` and ``t_next``.

    Args:
        x: latents ``(B, *D)``.
        v, v_next: velocities at ``(x, t)`` and at the predictor ``(x + dt v, t_next)``.
        t, t_next: current / next sigma (float, scalar or ``(B,)``).

    Returns:
        float32 ``(B, *D)``, in latent units.
    """
    x = x.float()
    dt = _expand(t_next, x) - _expand(t, x)
    return x + dt * 0.5 * (v.float() + v_next.float())
