"""The ``euler`` (DDIM) sampler; ``multistep`` is core.generation's, registered in ``plugins.samplers``."""

from __future__ import annotations

import torch

from core.generation import one_call_per_step


@torch.no_grad()
def euler(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None):
    """Euler on the probability-flow ODE, written as DDIM (Song et al. 2021, eta = 0):
    x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t. A final time of 0 returns x0."""
    sched = model.schedule

    def step(x, x0, t, s):
        return (sched.alpha(s) * x0 + sched.sigma(s) * (x - sched.alpha(t) * x0) / sched.sigma(t)).to(x.dtype)

    return one_call_per_step(model, noise, times, cond, step, return_trajectory=return_trajectory,
                             guidance=guidance, callback=callback)
