"""The hot-path tensor math of every method, as named ops.

Objectives call these rather than writing the arithmetic inline, so one place decides how they run:
the torch reference here, or the fused Triton kernels in ``core.kernels`` on CUDA.
All per-sample factors (alpha, sigma, weights) have shape [B] or are scalars.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.parameterization import bcast, to_x0


def add_noise(x0: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """Forward noising x_t = alpha x0 + sigma eps."""
    return bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps


def guided_x0(pred_cond: Tensor, pred_uncond: Tensor | None, x_t: Tensor, alpha, sigma, scale: float,
              prediction: str) -> Tensor:
    """Classifier-free guidance on the raw outputs, then conversion to x0.

    Guidance is linear, so combining outputs then converting equals converting then combining.
    """
    pred = pred_cond if pred_uncond is None else pred_uncond + scale * (pred_cond - pred_uncond)
    return to_x0(pred, x_t, alpha, sigma, prediction)


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD2's normalised distribution-matching gradient (Yin et al. 2024, eq. 8 as in their code).

    g = (x0_fake - x0_real) / mean_{non-batch}|x - x0_real|, non-finite entries set to 0.
    Computed in float64 (the reference does this conversion in float64) and cast back.
    """
    x64, real64 = x.detach().double(), x0_real.detach().double()
    norm = (x64 - real64).abs().flatten(1).mean(1)
    g = (x0_fake.detach().double() - real64) / bcast(norm, x64)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).to(x.dtype)


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """0.5 * mean((x - sg(x - g))^2): a loss whose gradient w.r.t. x is g / x.numel()."""
    g = dmd_gradient(x, x0_real, x0_fake)
    return 0.5 * torch.nn.functional.mse_loss(x, (x - g).detach(), reduction="mean")


def posterior_sample(z_t: Tensor, x0: Tensor, alpha_t, sigma_t, alpha_s, sigma_s, noise: Tensor | None,
                     eta: float = 1.0) -> Tensor:
    """Draw z_s from the DDIM(eta) posterior q(z_s | z_t, x0) for s < t.

    eta = 1 is the exact Gaussian posterior of the forward process; eta = 0 is deterministic DDIM.
    Standard algebra: with sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2, the posterior std is
    c = eta * sigma_s * sigma_{t|s} / sigma_t, and the mean is alpha_s x0 + sqrt(sigma_s^2 - c^2) eps_hat.
    """
    at, st, as_, ss = (bcast(v, z_t) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    eps_hat = (z_t - at * x0) / st
    var_ts = (st * st - (at / as_) ** 2 * ss * ss).clamp(min=0)
    c = eta * ss * var_ts.sqrt() / st
    mean = as_ * x0 + (ss * ss - c * c).clamp(min=0).sqrt() * eps_hat
    if noise is None or eta == 0:
        return mean
    return mean + c * noise


def weighted_loss(pred: Tensor, target: Tensor, weight=None, kind: str = "l2") -> Tensor:
    """mean_b w_b * mean_{non-batch} loss(pred - target), with kind 'l2' (squared) or 'l1'."""
    diff = pred - target
    per = diff.square() if kind == "l2" else diff.abs()
    per = per.flatten(1).mean(1)
    if weight is not None:
        per = per * torch.as_tensor(weight, dtype=per.dtype, device=per.device)
    return per.mean()


def mm_generator_loss(x_tilde: Tensor, aux_x0: Tensor, teacher_x0: Tensor, weight=None) -> Tensor:
    """Moment matching's generator surrogate (Salimans et al. 2024, Alg. 2): mean_b w_b <x~_b, sg(aux_b - teacher_b)> / D.

    Its gradient w.r.t. x~ is w_b (aux - teacher) / (B * D): descent moves x~ toward the teacher's moment
    and away from the auxiliary's. D is the number of elements per sample.
    """
    direction = (aux_x0 - teacher_x0).detach()
    per = (x_tilde * direction).flatten(1).mean(1)
    if weight is not None:
        per = per * torch.as_tensor(weight, dtype=per.dtype, device=per.device)
    return per.mean()
