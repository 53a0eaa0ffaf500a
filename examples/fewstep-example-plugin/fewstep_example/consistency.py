"""Objective ``example-cd``: consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2).

On a grid t_0 < t_1 < ... < t_N of the teacher's schedule (EDM's rho-spacing), with n ~ U{0..N-1}:

    x_{n+1}   = alpha_{n+1} x0 + sigma_{n+1} z                                  (noise real data)
    x^_n      = alpha_n D + sigma_n (x_{n+1} - alpha_{n+1} D) / sigma_{n+1}     (one DDIM/Euler step of
                with D = teacher(x_{n+1}, t_{n+1})                               the teacher's PF-ODE)
    L         = lambda_n d(f_theta(x_{n+1}, t_{n+1}), sg f_theta(x^_n, t_n))

The target uses the student itself under stop-gradient (mu = 0, as in improved consistency training,
Song & Dhariwal 2023) instead of an EMA copy, and lambda_n = 1 / (s_{n+1} - s_n) in VE-sigma units
(s = sigma / alpha), normalised to mean 1 over the grid. The boundary condition f(x, t_0) = x holds
approximately through the student's EDM preconditioning (c_skip -> 1 at small noise).
Sampling is the multistep consistency sampler (Alg. 1): the built-in ``multistep``.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from core import ops
from core.config import positive
from core.protocols import Phase, SamplingSpec
from core.timesteps import make_grid, ve_sigma


@attrs.define(kw_only=True)
class ConsistencyConfig:
    lr: float = attrs.field(default=1e-3, validator=positive, metadata={"doc": "student learning rate"})
    intervals: int = attrs.field(default=18, validator=positive, metadata={"doc": "N: ODE steps across the schedule"})
    distance: Literal["l2", "l1"] = attrs.field(default="l2", metadata={"doc": "d(., .) in the loss"})
    guidance: float | None = attrs.field(default=None, metadata={"doc": "teacher CFG scale (class-conditional teachers)"})
    sample_steps: int = attrs.field(default=2, validator=positive, metadata={"doc": "student steps when sampling"})
    sampler: str = attrs.field(default="multistep", metadata={"doc": "sampler for the student (multistep: CM Alg. 1)"})


class ConsistencyDistillation:
    """Consistency distillation (Song et al. 2023, Alg. 2): the student maps every point of a teacher
    ODE trajectory to the same x0."""

    needs_critic = False

    def __init__(self, config: ConsistencyConfig):
        self.config = config

    def build(self, nets):
        return {}

    def phases(self):
        return [Phase("consistency", trains=("student",), lr=self.config.lr)]

    def _grid(self, schedule):
        """t_N > ... > t_0 and the iCT weights lambda_n (mean 1), float64."""
        times = make_grid(schedule, self.config.intervals + 1, "polynomial", append_zero=False)
        s = ve_sigma(schedule, times)
        lam = 1 / (s[:-1] - s[1:])
        return times, lam / lam.mean()

    def loss(self, phase, ctx):
        c, student, teacher = self.config, ctx.student, ctx.teacher
        x0, cond = ctx.batch["x"], ctx.batch["cond"]
        sched = teacher.schedule
        times, lam = self._grid(sched)
        n = torch.randint(0, c.intervals, (x0.shape[0],))
        t, s = times[n], times[n + 1]  # t noisier than s
        at, st, as_, ss = (v.to(x0.dtype) for v in (sched.alpha(t), sched.sigma(t), sched.alpha(s), sched.sigma(s)))
        x_t = ops.add_noise(x0, torch.randn_like(x0), at, st)
        with torch.no_grad():
            kw = {} if c.guidance is None else {"guidance": c.guidance}
            d = teacher.denoise(x_t, t.to(x0.dtype), cond, **kw)
            x_s = ops.add_noise(d, (x_t - at[:, None] * d) / st[:, None], as_, ss)  # DDIM step t -> s
            target = student.denoise(x_s, s.to(x0.dtype), cond)
        pred = student.denoise(x_t, t.to(x0.dtype), cond)
        loss = ops.weighted_loss(pred, target, lam[n].to(x0.dtype), c.distance)
        return loss, {"t_mean": float(t.mean())}

    def _spec(self, steps: int, schedule) -> SamplingSpec:
        # steps evaluations: t_max, the next steps-1 points of a (steps+1)-point grid, then 0 (return x0)
        grid = make_grid(schedule, steps + 1, "polynomial", append_zero=False)[:-1]
        return SamplingSpec(self.config.sampler, [*grid.tolist(), 0.0], {})

    def sampling(self, student):
        return self._spec(self.config.sample_steps, student.schedule)

    def with_steps(self, spec, steps, student):
        return self._spec(steps, student.schedule)
