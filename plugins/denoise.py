"""Objective ``denoise``: plain diffusion training with EDM weighting (Karras et al. 2022, sec. 5).

Trains a network teacher from data: x0 ~ data, log(sigma_ve) ~ N(P_mean, P_std^2),
L = lambda(sigma) ||D(x0 + noise) - x0||^2 with lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2.
Class labels are dropped with probability ``label_dropout`` so the result supports CFG.
``teacher=checkpoint teacher.path=RUN`` then serves the trained network as a teacher.
"""

from __future__ import annotations

import attrs
import torch

from core import hookimpl, ops
from core.config import positive, unit_interval
from core.parameterization import edm_weight
from core.protocols import Phase, SamplingSpec
from core.timesteps import make_grid, ve_sigma


@attrs.define(kw_only=True)
class DenoiseConfig:
    lr: float = attrs.field(default=2e-3, validator=positive)
    p_mean: float = attrs.field(default=-1.2, metadata={"doc": "mean of log sigma (EDM)"})
    p_std: float = attrs.field(default=1.2, validator=positive, metadata={"doc": "std of log sigma (EDM)"})
    label_dropout: float = attrs.field(default=0.1, validator=unit_interval, metadata={"doc": "CFG training"})
    sample_steps: int = attrs.field(default=32, validator=positive, metadata={"doc": "Euler steps when sampling"})


class Denoise:
    """Plain diffusion training (EDM loss) of the student network, from the run's dataset."""

    needs_critic = False

    def __init__(self, config: DenoiseConfig):
        self.config = config

    def build(self, nets):
        return {}

    def phases(self):
        return [Phase("denoiser", trains=("student",), lr=self.config.lr)]

    def loss(self, phase, ctx):
        c, net = self.config, ctx.student
        x0, labels = ctx.batch["x"], ctx.batch["cond"]
        if labels is not None and c.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < c.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        sched = net.schedule
        sigma_ve = torch.exp(c.p_mean + c.p_std * torch.randn(x0.shape[0], device=x0.device, dtype=torch.float64))
        t = sched.t_from_logsnr(-2 * sigma_ve.log()).clamp(sched.t_min, sched.t_max)
        sigma_ve = ve_sigma(sched, t)  # after clamping
        x_t = ops.add_noise(x0, torch.randn_like(x0), sched.alpha(t), sched.sigma(t))
        weight = edm_weight(sigma_ve, net.sigma_data)
        loss = ops.weighted_loss(net.denoise(x_t, t.to(x0.dtype), labels), x0, weight.to(x0.dtype), "l2")
        return loss, {}

    def sampling(self, student):
        times = make_grid(student.schedule, self.config.sample_steps, "polynomial")
        return SamplingSpec("euler", times.tolist(), {})


@hookimpl
def register_objectives(register):
    register("denoise", Denoise, config=DenoiseConfig)
