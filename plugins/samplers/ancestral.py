"""Sampler ``ancestral``: Algorithm 1 of Salimans et al. 2024 ("Multistep Distillation of Diffusion
Models via Moment Matching"), with a DDIM-style eta.

At each step the x-prediction x0 = model(z_t, t) is plugged into the Gaussian posterior of the forward
process, z_s ~ q(z_s | z_t, x = x0) (``core.ops.posterior_sample``, in float64 as the EDM code bases do).
eta = 1 is the exact ancestral step (DDPM), eta = 0 deterministic DDIM. A final time of 0 returns the
last x0, so a grid of k times plus the 0 sentinel costs k model calls. Works for teachers and students.
"""

from __future__ import annotations

import attrs
import torch

from core import hookimpl, ops
from core.config import unit_interval
from core.generation import one_call_per_step


@attrs.define(kw_only=True)
class AncestralConfig:
    eta: float = attrs.field(default=1.0, validator=unit_interval,
                             metadata={"doc": "posterior noise: 1 ancestral (Alg. 1), 0 DDIM"})


@torch.no_grad()
def ancestral(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None,
              eta: float = 1.0, generator=None):
    """Ancestral sampling (Salimans et al. 2024, Alg. 1): x0 = model(z_t, t), then z_s ~ q(z_s | z_t, x0)
    with DDIM(eta) noise. A final time of 0 returns x0."""
    sched = model.schedule

    def step(x, x0, t, s):
        xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        return ops.posterior_sample(x.double(), x0.double(), sched.alpha(t), sched.sigma(t), sched.alpha(s),
                                    sched.sigma(s), xi, eta).to(x.dtype)

    return one_call_per_step(model, noise, times, cond, step, return_trajectory=return_trajectory,
                             guidance=guidance, callback=callback)


@hookimpl
def register_samplers(register):
    register("ancestral", ancestral, config=AncestralConfig)
