"""Noise schedules: x_t = alpha(t) x0 + sigma(t) eps.

Every network role (teacher, student, critic) and every sampler talks about time through one of these
objects, so that an eps-predicting SD teacher, an EDM network and a rectified-flow model are
interchangeable. Times are plain tensors in the schedule's own units: the diffusers timestep for
``vp-discrete``, sigma for ``edm``, t in [0, 1] for ``vp-cosine`` and ``flow``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_tensor(t, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    dtype = like.dtype if like is not None else torch.float64
    return torch.as_tensor(t, dtype=dtype)


class NoiseSchedule:
    """Base class. Subclasses define alpha, sigma, ``t_min``/``t_max`` and the inverse of logSNR."""

    name = "schedule"
    t_min: float
    t_max: float
    #: True when large t means more noise (all schedules here); samplers walk t_max -> t_min.

    def alpha(self, t) -> Tensor:
        raise NotImplementedError

    def sigma(self, t) -> Tensor:
        raise NotImplementedError

    def logsnr(self, t) -> Tensor:
        """log(alpha^2 / sigma^2)."""
        t = _as_tensor(t)
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_logsnr(self, lam) -> Tensor:
        raise NotImplementedError

    def t_from_fraction(self, u) -> Tensor:
        """Map u in [0, 1] to a time, u=0 the least and u=1 the most noisy point of the training range.

        Objectives that sample "a fraction of the teacher's schedule" (DMD2's 0.02-0.98) use this, so
        their defaults mean the same thing on every schedule.
        """
        u = _as_tensor(u)
        return self.t_min + u * (self.t_max - self.t_min)

    def config(self) -> dict:
        """JSON-able description; ``schedule_from_config`` inverts it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class EDMSchedule(NoiseSchedule):
    """Variance exploding, t = sigma (Karras et al. 2022): alpha = 1."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.t_min, self.t_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def alpha(self, t):
        t = _as_tensor(t)
        return torch.ones_like(t)

    def sigma(self, t):
        return _as_tensor(t).clone()

    def t_from_logsnr(self, lam):
        return torch.exp(-_as_tensor(lam) / 2)

    def t_from_fraction(self, u):
        # Karras rho-spacing: the distribution EDM networks are trained and sampled on.
        u = _as_tensor(u)
        lo, hi = self.t_min ** (1 / self.rho), self.t_max ** (1 / self.rho)
        return (lo + u * (hi - lo)) ** self.rho

    def config(self):
        return {"kind": self.name, "sigma_min": self.t_min, "sigma_max": self.t_max, "rho": self.rho}


class VPCosineSchedule(NoiseSchedule):
    """Variance preserving cosine schedule (Nichol & Dhariwal 2021): alpha = cos(pi t / 2)."""

    name = "vp-cosine"

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999):
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha(self, t):
        return torch.cos(math.pi / 2 * _as_tensor(t))

    def sigma(self, t):
        return torch.sin(math.pi / 2 * _as_tensor(t))

    def logsnr(self, t):
        return -2 * torch.log(torch.tan(math.pi / 2 * _as_tensor(t)))

    def t_from_logsnr(self, lam):
        return 2 / math.pi * torch.atan(torch.exp(-_as_tensor(lam) / 2))

    def config(self):
        return {"kind": self.name, "t_min": self.t_min, "t_max": self.t_max}


class FlowSchedule(NoiseSchedule):
    """Rectified flow: x_t = (1 - t) x0 + t eps."""

    name = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0 - 1e-3):
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha(self, t):
        return 1 - _as_tensor(t)

    def sigma(self, t):
        return _as_tensor(t).clone()

    def t_from_logsnr(self, lam):
        # alpha/sigma = exp(lam/2) = (1-t)/t  =>  t = 1 / (1 + exp(lam/2))
        return torch.sigmoid(-_as_tensor(lam) / 2)

    def config(self):
        return {"kind": self.name, "t_min": self.t_min, "t_max": self.t_max}


class VPDiscreteSchedule(NoiseSchedule):
    """DDPM-style discrete schedule from ``alphas_cumprod`` (SD1.5, SDXL).

    t is the (possibly fractional) diffusers timestep in [0, N-1]; log(alpha_bar) is interpolated
    linearly between integer steps, as DPM-Solver does, so continuous-time samplers work on it.
    """

    name = "vp-discrete"

    def __init__(self, alphas_cumprod):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.alphas_cumprod = ac
        self._log_ac = torch.log(ac)
        self.t_min, self.t_max = 0.0, float(len(ac) - 1)
        self._logsnr = self._log_ac - torch.log1p(-ac)  # decreasing in t

    def _log_alpha_bar(self, t):
        t = _as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.float64
        tt = t.to(torch.float64).clamp(self.t_min, self.t_max)
        lo = tt.floor().long().clamp(max=len(self._log_ac) - 2)
        w = tt - lo
        table = self._log_ac.to(tt.device)
        return ((1 - w) * table[lo] + w * table[lo + 1]).to(dtype)

    def alpha(self, t):
        return torch.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(self._log_alpha_bar(t)))

    def t_from_logsnr(self, lam):
        lam = _as_tensor(lam)
        dtype = lam.dtype
        lam64 = lam.to(torch.float64)
        # log alpha_bar = -softplus(-lam); invert the piecewise-linear table by search.
        target = -torch.nn.functional.softplus(-lam64)
        table = -self._log_ac.to(lam64.device)  # increasing
        idx = torch.searchsorted(table, -target).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        w = ((-target - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + w).to(dtype)

    def t_from_fraction(self, u):
        return _as_tensor(u) * self.t_max

    def config(self):
        return {"kind": self.name, "alphas_cumprod": self.alphas_cumprod.tolist()}


SCHEDULES = {cls.name: cls for cls in (EDMSchedule, VPCosineSchedule, FlowSchedule, VPDiscreteSchedule)}


def schedule_from_config(cfg: dict) -> NoiseSchedule:
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    return SCHEDULES[kind](**cfg)


def make_schedule(kind: str, **kwargs) -> NoiseSchedule:
    if kind not in SCHEDULES:
        from core.errors import UsageError

        raise UsageError(f"unknown schedule '{kind}'; choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[kind](**kwargs)
