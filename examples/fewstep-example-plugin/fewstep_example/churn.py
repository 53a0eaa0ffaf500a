"""Sampler ``example-churn``: the EDM stochastic sampler (Karras et al. 2022, Alg. 2): churn, then Heun.

Works in VE form y = x / alpha with noise level s = sigma / alpha, so one rule serves EDM, VP and flow
schedules. Each step from s_i to s_{i+1}:

    gamma = min(churn / N, sqrt(2) - 1)                   (0 outside [s_lo, s_hi])
    s^    = s_i (1 + gamma),  y^ = y + sqrt(s^^2 - s_i^2) * s_noise * eps    (raise the noise level)
    D     = model(alpha(t^) y^, t^)                       (t^ = the schedule's time of s^)
    d     = (y^ - D) / s^,  y' = y^ + (s_{i+1} - s^) d     (Euler step down to s_{i+1})
    d'    = (y' - model(y', t_{i+1})) / s_{i+1},  y = y^ + (s_{i+1} - s^) (d + d') / 2   (Heun correction)

A final time of 0 returns D (no correction). Each step costs two model calls, the last one one.
"""

from __future__ import annotations

import math

import attrs
import torch

from core.config import non_negative, positive
from core.parameterization import bcast
from core.timesteps import ve_sigma


@attrs.define(kw_only=True)
class ChurnConfig:
    churn: float = attrs.field(default=10.0, validator=non_negative, metadata={"doc": "S_churn: total added noise"})
    s_noise: float = attrs.field(default=1.0, validator=positive, metadata={"doc": "S_noise: scale of the added noise"})
    s_lo: float = attrs.field(default=0.05, validator=non_negative, metadata={"doc": "churn only for noise >= s_lo"})
    s_hi: float = attrs.field(default=50.0, validator=positive, metadata={"doc": "churn only for noise <= s_hi"})


def _batch(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device).to(
        x.dtype if x.dtype == torch.float64 else torch.float32)


@torch.no_grad()
def euler_churn(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None,
                churn: float = 10.0, s_noise: float = 1.0, s_lo: float = 0.05, s_hi: float = 50.0, generator=None):
    """EDM stochastic sampler (Karras et al. 2022, Alg. 2): add noise up to s^ = s_i (1 + gamma), then a
    Heun step of the probability-flow ODE down to s_{i+1}. A final time of 0 returns the denoised x0."""
    sched = model.schedule
    n = len(times) - 1
    gamma_max = min(churn / max(n, 1), math.sqrt(2) - 1)
    s_top = float(ve_sigma(sched, sched.t_max))
    t0 = torch.tensor(float(times[0]), dtype=torch.float64)
    x = noise * sched.sigma(t0).to(noise.dtype)
    y = x / sched.alpha(t0).to(x.dtype)
    traj = [x]
    kw = {} if guidance is None else {"guidance": guidance}
    for i in range(n):
        s_i, t_next = float(ve_sigma(sched, float(times[i]))), float(times[i + 1])
        gamma = gamma_max if s_lo <= s_i <= s_hi else 0.0
        s_hat = min(s_i * (1 + gamma), s_top)  # stay inside the schedule's range
        if s_hat > s_i:
            eps = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            y = y + math.sqrt(s_hat**2 - s_i**2) * s_noise * eps
        t_hat = float(sched.t_from_logsnr(torch.tensor(-2 * math.log(s_hat), dtype=torch.float64))) if s_hat > s_i \
            else float(times[i])
        a_hat = sched.alpha(torch.tensor(t_hat, dtype=torch.float64)).to(y.dtype)
        d = model.denoise(a_hat * y, _batch(t_hat, y), cond, **kw)
        if t_next == 0:
            x = y = d
        else:
            s_next = float(ve_sigma(sched, t_next))
            a_next = sched.alpha(torch.tensor(t_next, dtype=torch.float64)).to(y.dtype)
            slope = (y - d) / s_hat
            y_euler = y + (s_next - s_hat) * slope
            d_next = model.denoise(a_next * y_euler, _batch(t_next, y), cond, **kw)
            y = y + (s_next - s_hat) * (slope + (y_euler - d_next) / s_next) / 2
            x = a_next * y
        if callback is not None:
            callback({"x": x, "i": i, "t": float(times[i]), "t_hat": t_hat, "denoised": d})
        traj.append(x)
    return (x, traj) if return_trajectory else x
