"""Conversions between network outputs (eps, v, x0, flow velocity), x0 and the score.

All take per-sample alpha/sigma (shape [B] or scalars) for x_t = alpha x0 + sigma eps, and hold for any
alpha, sigma (VP, VE, flow), not only alpha^2 + sigma^2 = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTIONS = ("eps", "v", "x0", "flow")


def bcast(v, x: Tensor) -> Tensor:
    """Per-sample scalars [B] (or a 0-d value) -> shape broadcastable against x [B, ...]."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        return v.to(x.dtype) if v.is_floating_point() else v.to(x.dtype)
    return v.to(x.dtype).reshape(v.shape[0], *([1] * (x.ndim - 1)))


def to_x0(pred: Tensor, x_t: Tensor, alpha, sigma, prediction: str) -> Tensor:
    """x0 implied by a network output of the given kind."""
    a, s = bcast(alpha, x_t), bcast(sigma, x_t)
    if prediction == "x0":
        return pred
    if prediction == "eps":
        return (x_t - s * pred) / a
    if prediction == "v":  # v = alpha eps - sigma x0
        return (a * x_t - s * pred) / (a * a + s * s)
    if prediction == "flow":  # v = eps - x0
        return (x_t - s * pred) / (a + s)
    raise ValueError(f"unknown prediction type '{prediction}'; choose one of {PREDICTIONS}")


def from_x0(x0: Tensor, x_t: Tensor, alpha, sigma, prediction: str) -> Tensor:
    """The network output of the given kind that corresponds to x0 (inverse of ``to_x0``)."""
    a, s = bcast(alpha, x_t), bcast(sigma, x_t)
    eps = (x_t - a * x0) / s
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction type '{prediction}'; choose one of {PREDICTIONS}")


def x0_to_score(x0: Tensor, x_t: Tensor, alpha, sigma) -> Tensor:
    """grad_x log p_t(x_t) = (alpha x0 - x_t) / sigma^2 (Tweedie)."""
    s = bcast(sigma, x_t)
    return (bcast(alpha, x_t) * x0 - x_t) / (s * s)


def precondition(alpha, sigma, sigma_data: float, like: Tensor):
    """EDM preconditioning generalised to x_t = alpha x0 + sigma eps (Karras et al. 2022, Table 1).

    Returns c_in, c_skip, c_out so that D = c_skip x_t + c_out F(c_in x_t) has unit-variance input and
    target for data of std sigma_data; with alpha = 1 it is exactly EDM's.
    """
    a, s = bcast(alpha, like), bcast(sigma, like)
    var = (a * sigma_data) ** 2 + s * s
    c_in = var.rsqrt()
    c_skip = a * sigma_data**2 / var
    c_out = s * sigma_data * c_in
    return c_in, c_skip, c_out


def edm_weight(sigma, sigma_data: float):
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022,
    Table 1) for an x0-MSE at VE noise level sigma (= sigma/alpha of any schedule): the preconditioned
    network's target then has unit variance at every sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
