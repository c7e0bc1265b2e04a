"""Reward-driven objectives of the Stage-1 trainers: group advantages, the PPO-clip loss with GRPO-Guard's ratio
normalisation, and DiffusionNFT's implicit velocities and loss.

Pure float32 tensor math, no pipeline objects; conventions as in `transition` (latents ``(B, *D)``, time runs from
``t = 1``, noise, to ``t = 0``, data; ``x_t = (1 - t) x_0 + t eps``; velocity ``v = eps - x_0``, so that
``x_0 = x_t - t v``).

References: Flow-GRPO (Liu et al., arXiv 2505.05470), GRPO-Guard (Wang et al., arXiv 2510.22319), DiffusionNFT
(Zheng et al., arXiv 2509.16117).
"""

from __future__ import annotations

import torch

from .transition import _expand


SCALE_REWARDS = ("group", "batch", "none")
RATIO_NORM_BIASES = ("sample", "batch")
ADV_EPS = 1e-4  # added to the std of the advantages (Flow-GRPO's stat tracker)
NFT_WEIGHT_MIN = 1e-5  # floor of NFT's adaptive weight


# --------------------------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale: str = "group",
    clip: float | None = None,
    eps: float = ADV_EPS,
) -> torch.Tensor:
    """Group-normalised advantages ``A_i = (r_i - mean_g(r)) / (std + eps)``, clipped to ``[-clip, clip]``.

    Rows are grouped consecutively: rows ``[k G, (k + 1) G)`` are the ``G = num_generations`` images of prompt k.
    The mean is always the group's; the std is the group's (``"group"``, Flow-GRPO's per-prompt tracking), the whole
    batch's (``"batch"``), or 1 (``"none"``). Stds are the population std (``unbiased=False``).

    Computed in float64 (as Flow-GRPO's numpy stat tracker), and a group whose rewards are all equal gets advantages
    of exactly 0 (in float32 its mean is not always one of its values: ``mean([0.7] * 24)`` leaves about ``6e-8``,
    i.e. advantages of about ``6e-4`` after the division by ``std + eps = 1e-4``).

    Args:
        rewards: ``(K G,)`` total rewards (reward units).
        num_generations: group size ``G``.
        scale: one of ``SCALE_REWARDS``.
        clip: ``adv_clip_max`` or None.
        eps: added to the std.

    Returns:
        float32 ``(K G,)``, dimensionless.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALE_REWARDS}")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be (K * {num_generations},), got shape {tuple(rewards.shape)}")
    rewards = rewards.double()
    groups = rewards.view(-1, num_generations)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std(unbiased=False) + eps)
    centred = torch.where(zero_std_groups(rewards, num_generations).unsqueeze(1), 0.0, centred)
    advantages = centred.flatten().float()
    return advantages if clip is None else advantages.clamp(-clip, clip)


def zero_std_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Which groups' rewards are all equal (their advantages are 0, so they carry no policy gradient).

    Args:
        rewards: ``(K G,)`` total rewards, grouped as in ``group_advantages``.
        num_generations: group size ``G``.

    Returns:
        bool ``(K,)``.
    """
    groups = rewards.view(-1, num_generations)
    return groups.amax(dim=1) == groups.amin(dim=1)


# --------------------------------------------------------------------------------------------------------------------
# Flow-GRPO / GRPO-Guard
# --------------------------------------------------------------------------------------------------------------------


def grpo_guard_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor | float,
    bias: str = "sample",
    num_groups: int = 1,
) -> torch.Tensor:
    """GRPO-Guard's RatioNorm: the per-step log importance ratio, recentred and rescaled.

    With per-element-mean Gaussian log-densities (``gaussian_log_prob(..., reduction="mean")``) of the sampled ``x'``
    under the current mean ``mu_theta`` and the rollout mean ``mu_old``, both with the transition std ``sigma_bar``
    (``step_std``),

        log r = log p_theta(x') - log p_old(x') = [ ||x' - mu_old||^2 - ||x' - mu_theta||^2 ] / (2 D sigma_bar^2)

    whose expectation over ``x' ~ p_old`` is ``-b``, ``b = ||mu_theta - mu_old||^2 / (2 D sigma_bar^2) >= 0``: the
    ratio is biased below 1, the more so at small ``sigma_bar`` (late steps). RatioNorm adds the bias back and
    scales by ``sigma_bar``, so that the spread no longer depends on the step:

        log r_norm = sigma_bar * (log r + b).

    Two forms of ``b`` (``bias``):

    * ``"sample"`` (default; the paper's form): each row's own ``b_i``. Then exactly
      ``log r_norm_i = <x'_i - mu_old_i, mu_theta_i - mu_old_i> / (D sigma_bar)``, zero-mean for every row.
    * ``"batch"`` (the released code, ``train_sd3_GRPO_Guard.py``: its ``.mean(dim=tuple(range(1, log_prob.ndim)))``
      on the ``(B,)`` log-prob is ``mean(dim=())``, a mean over the whole batch): every row of a step gets the batch
      mean ``b_bar``, so ``log r_norm_i`` is the ``"sample"`` value plus ``sigma_bar (b_bar - b_i)``. Rows are split
      into ``num_groups`` consecutive equal blocks (one per trained step, step-major) and ``b`` is averaged within
      each block.

    The two agree for a batch of one, and whenever the policy has not moved (``mu_theta == mu_old``: ``b = 0``, so on
    the first optimizer step on a batch); they differ by the second-order term above otherwise. Both are 0 exactly
    when the policy has not moved. A row with ``sigma_bar = 0`` (CPS's deterministic last step) gets 0.

    Args:
        log_prob, old_log_prob: ``(B,)`` per-element-mean Gaussian log-densities (nats per latent element).
        mean, old_mean: ``(B, *D)`` transition means; ``mean`` carries the gradient.
        std: transition std ``sigma_bar``, float / scalar / ``(B,)``, ``>= 0`` (latent units).
        bias: ``"sample"`` or ``"batch"`` (``RATIO_NORM_BIASES``).
        num_groups: blocks of rows that ``"batch"`` averages over separately; must divide ``B``.

    Returns:
        float32 ``(B,)``, the normalised log-ratio (dimensionless).
    """
    if bias not in RATIO_NORM_BIASES:
        raise ValueError(f"unknown bias {bias!r}; expected one of {RATIO_NORM_BIASES}")
    rows = log_prob.shape[0]
    if num_groups < 1 or rows % num_groups:
        raise ValueError(f"num_groups must be >= 1 and divide the {rows} rows, got {num_groups}")
    std = torch.as_tensor(std, dtype=torch.float32, device=log_prob.device).expand(rows)
    deterministic = std == 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    shift = (mean.float() - old_mean.float().detach()).pow(2).flatten(1).mean(dim=1) / (2.0 * safe_std**2)
    if bias == "batch":
        shift = shift.view(num_groups, -1).mean(dim=1, keepdim=True).expand(num_groups, rows // num_groups).flatten()
    log_ratio = (log_prob.float() - old_log_prob.float() + shift) * std
    return torch.where(deterministic, torch.zeros_like(log_ratio), log_ratio)


def grpo_guard_step_weight(t, t_next) -> torch.Tensor:
    """GRPO-Guard's per-step gradient reweighting, ``1 / (t - t_next)``: the policy loss of a step is divided by
    ``-dt = sigma_bar^2 / sigma_t^2``, which undoes the ``-dt`` that the normalised ratio's gradient carries and so
    evens out the gradient norm across steps (large steps no longer dominate).

    Args:
        t, t_next: current / next sigma (float, scalar or ``(B,)``), ``t_next < t``.

    Returns:
        float32 tensor of the broadcast shape of ``t`` and ``t_next`` (1 / time).
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    t_next = torch.as_tensor(t_next, dtype=torch.float32, device=t.device)
    return 1.0 / (t - t_next)


def ppo_clip_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped policy loss per sample, ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` with ``r = exp(log_ratio)``.

    Args:
        log_ratio: ``(B,)`` log importance ratio (plain or GRPO-Guard normalised).
        advantages: ``(B,)`` advantages (detached here).
        clip_range: ``eps > 0``.

    Returns:
        float32 ``(B,)`` loss (minimise it).
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    ratio = torch.exp(log_ratio.float())
    advantages = advantages.float().detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


# --------------------------------------------------------------------------------------------------------------------
# DiffusionNFT
# --------------------------------------------------------------------------------------------------------------------


def nft_optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """NFT's optimality probability ``r = clip(A, -c, c) / (2 c) + 1/2`` in ``[0, 1]`` (``c = adv_clip_max``):
    the best images of a group get ``r`` near 1, the worst near 0, an average one 1/2.

    Args:
        advantages: ``(B,)`` normalised advantages.
        clip: ``c > 0``.

    Returns:
        float32 ``(B,)`` in ``[0, 1]``.
    """
    return (advantages.float().clamp(-clip, clip) / (2.0 * clip) + 0.5).clamp(0.0, 1.0)


def nft_implicit_velocities(
    v_theta: torch.Tensor, v_old: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffusionNFT's implicit positive and negative policies:

        v+ = beta v_theta + (1 - beta) v_old,      v- = (1 + beta) v_old - beta v_theta,

    mirror images of each other about ``v_old`` (``v+ + v- = 2 v_old``). ``v_old`` is detached.

    Returns:
        ``(v_plus, v_minus)``, float32, ``v_theta``'s shape.
    """
    v_theta, v_old = v_theta.float(), v_old.float().detach()
    return beta * v_theta + (1.0 - beta) * v_old, (1.0 + beta) * v_old - beta * v_theta


def _adaptive_mse(x0_pred: torch.Tensor, x0: torch.Tensor, weight_min: float) -> torch.Tensor:
    dims = tuple(range(1, x0.dim()))
    with torch.no_grad():  # the weight is a constant of the gradient
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(weight_min).float()
    return ((x0_pred - x0) ** 2 / weight).mean(dim=dims)


def nft_loss(
    x_t: torch.Tensor,
    t,
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
    weight_min: float = NFT_WEIGHT_MIN,
) -> torch.Tensor:
    """DiffusionNFT's negative-aware flow-matching loss per sample.

    On the forward process ``x_t = (1 - t) x0 + t eps`` of a generated image ``x0``, with the implicit velocities
    ``v+``, ``v-`` (``nft_implicit_velocities``) and their clean-image predictions ``x0± = x_t - t v±``:

        L = r ||x0+ - x0||^2 / w+  +  (1 - r) ||x0- - x0||^2 / w-,

    element-averaged, where ``w± = max(mean |x0± - x0|, weight_min)`` is the adaptive per-sample weight (detached:
    a constant of the gradient). Good images (``r`` near 1) pull the positive policy toward them, bad ones
    (``r`` near 0) push the negative one, i.e. the current policy away.

    Two identities pin the signs (both at ``v_old == v_theta``, where ``x0+ = x0- = x0_theta`` and ``w+ = w-``):
    ``r = 1/2`` gives a zero gradient (a neutral reward moves nothing), and ``r = 1`` gives ``beta`` times the
    gradient of the weighted flow-matching loss ``||x0_theta - x0||^2 / w``.

    The released code divides by ``beta`` and multiplies by ``adv_clip_max``; `DiffusionNFTTrainer` applies that
    constant to the mean of this loss, so that its learning rates transfer.

    Args:
        x_t: ``(B, *D)`` noised latents.
        t: sigma, float / scalar / ``(B,)``.
        v_theta: ``(B, *D)`` current velocity (carries the gradient).
        v_old: ``(B, *D)`` old-policy velocity (detached).
        x0: ``(B, *D)`` the generated clean latents.
        r: ``(B,)`` optimality probabilities in ``[0, 1]`` (``nft_optimality``).
        beta: implicit-policy strength ``beta > 0``.
        weight_min: floor of the adaptive weight.

    Returns:
        float32 ``(B,)``, in (latent units) per weight unit.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    x_t, x0 = x_t.float(), x0.float()
    v_plus, v_minus = nft_implicit_velocities(v_theta, v_old, beta)
    t = _expand(t, x_t)
    positive = _adaptive_mse(x_t - t * v_plus, x0, weight_min)
    negative = _adaptive_mse(x_t - t * v_minus, x0, weight_min)
    r = r.float().to(positive.device)
    return r * positive + (1.0 - r) * negative
