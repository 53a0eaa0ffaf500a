"""The probability-flow ODE in VE coordinates, shared by the ODE samplers (plugins/samplers/ode.py) and SFD.

With y = x / alpha and s = sigma / alpha (= exp(-logSNR/2)) the PF-ODE of x_t = alpha x0 + sigma eps is
dy/ds = (y - D(x; t)) / s, where D is the denoiser ``model.denoise`` (Karras et al. 2022, eq. 4 with
s(t) = alpha). Coefficients are float64 scalars; states keep the noise's dtype. ``afs=True`` (analytical
first step, Zhou et al. 2024 "AMED", used by SFD) replaces the first network call by the direction
d = y / sqrt(1 + s^2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from core.errors import UsageError
from core.protocols import time_batch


def afs_x0(y: Tensor, s: float) -> Tensor:
    """The x0 implied by AFS at VE level s: D = y - s * d with d = y / sqrt(1 + s^2) (AMED, SFD sec. 4)."""
    return y * (1 - s / math.sqrt(1 + s * s))


class PFODE:
    """One solve's view of the ODE: per-timestamp alpha, VE sigma and lambda = -log s, and counted
    denoiser calls in VE coordinates."""

    def __init__(self, model, times, cond=None, guidance=None, model_kwargs=None, afs=False):
        times = torch.as_tensor(times, dtype=torch.float64).flatten().cpu()
        if times.numel() < 2 or not bool((times[:-1] > times[1:]).all()):
            raise UsageError(f"sampler times must be a strictly decreasing grid of >= 2 values, got {times.tolist()}")
        sched = model.schedule
        self.model, self.cond, self.guidance, self.kwargs, self.afs = model, cond, guidance, model_kwargs or {}, afs
        self.times = [float(t) for t in times]
        self.alpha = [1.0 if t == 0 else float(sched.alpha(torch.tensor(t, dtype=torch.float64))) for t in self.times]
        self.s = [0.0 if t == 0 else float(sched.sigma(torch.tensor(t, dtype=torch.float64))) / a
                  for t, a in zip(self.times, self.alpha)]
        self.lam = [math.inf if s == 0 else -math.log(s) for s in self.s]
        self.n = len(self.times) - 1  # steps
        self.nfe = 0

    def start(self, noise: Tensor) -> Tensor:
        """y at times[0]: s_0 * noise (x = sigma_0 * noise; the data term is neglected, as in
        ``core.generation.start``)."""
        return noise * self.s[0]

    def x(self, y: Tensor, i: int) -> Tensor:
        return y * self.alpha[i]

    def denoised(self, y: Tensor, i: int) -> Tensor:
        """D at timestamp i (AFS's analytic estimate at i = 0 when on)."""
        if i == 0 and self.afs:
            return afs_x0(y, self.s[0])
        self.nfe += 1
        x = self.x(y, i)
        tt = time_batch(self.times[i], x)
        extra = {"guidance": self.guidance} if self.guidance is not None else {}
        return self.model.denoise(x, tt, self.cond, **extra, **self.kwargs).to(y.dtype)

    def euler(self, y: Tensor, d0: Tensor, i: int) -> Tensor:
        """First-order step i -> i+1 (DDIM): y' = r y + (1 - r) D with r = s_{i+1} / s_i."""
        r = self.s[i + 1] / self.s[i]
        return r * y + (1 - r) * d0


def integrate(ode: PFODE, noise: Tensor, step, return_trajectory: bool, callback):
    """The loop every solver shares: ``step(y, i) -> (y_next, denoised)``; the trajectory is in x space."""
    y = ode.start(noise)
    traj = [ode.x(y, 0)]
    for i in range(ode.n):
        y, d = step(y, i)
        x = ode.x(y, i + 1)
        if callback is not None:
            callback({"x": x, "i": i, "t": ode.times[i], "denoised": d, "nfe": ode.nfe})
        traj.append(x)
    return (traj[-1], traj) if return_trajectory else traj[-1]
