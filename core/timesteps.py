"""Time grids for samplers: decreasing 1-D float64 tensors in the schedule's own units.

A grid may end in the sentinel 0.0, meaning "clean data": the last step then returns the denoised
estimate (as EDM and k-diffusion do with sigma = 0). Grids are built in VE-sigma space
(sigma/alpha, i.e. exp(-logSNR/2)) and mapped to each schedule's t, so "polynomial, rho=7" means
the same spacing for an EDM, VP or flow model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.errors import UsageError
from core.schedules import NoiseSchedule

GRIDS = ("polynomial", "logsnr", "uniform", "discrete", "explicit")


def ve_sigma(schedule: NoiseSchedule, t) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.exp(-schedule.logsnr(t) / 2)


def _from_ve_sigma(schedule: NoiseSchedule, s: Tensor) -> Tensor:
    return schedule.t_from_logsnr(-2 * torch.log(s)).to(torch.float64)


def make_grid(schedule: NoiseSchedule, points: int, kind: str = "polynomial", rho: float = 7.0,
              t_min: float | None = None, t_max: float | None = None, times=None,
              append_zero: bool = True) -> Tensor:
    """``points`` timestamps from t_max down to t_min (plus the clean sentinel 0.0 if ``append_zero``).

    With ``append_zero`` a grid of ``points`` timestamps costs ``points`` denoiser calls in Euler;
    without it, ``points - 1`` (the last state is the output, as in SFD).
    """
    t_min = schedule.t_min if t_min is None else float(t_min)
    t_max = schedule.t_max if t_max is None else float(t_max)
    if kind == "explicit":
        if times is None:
            raise UsageError("grid 'explicit' needs times=[...]")
        grid = torch.as_tensor(times, dtype=torch.float64)
        if not bool((grid[:-1] > grid[1:]).all()):
            raise UsageError(f"explicit times must decrease strictly, got {grid.tolist()}")
        return grid
    if points < 1:
        raise UsageError(f"a time grid needs at least 1 point, got {points}")
    u = torch.linspace(0, 1, points, dtype=torch.float64) if points > 1 else torch.zeros(1, dtype=torch.float64)
    if kind == "polynomial":
        hi, lo = ve_sigma(schedule, t_max) ** (1 / rho), ve_sigma(schedule, t_min) ** (1 / rho)
        grid = _from_ve_sigma(schedule, (hi + u * (lo - hi)) ** rho)
    elif kind == "logsnr":
        hi, lo = schedule.logsnr(torch.tensor(t_max, dtype=torch.float64)), schedule.logsnr(
            torch.tensor(t_min, dtype=torch.float64))
        grid = schedule.t_from_logsnr(hi + u * (lo - hi)).to(torch.float64)
    elif kind == "uniform":
        grid = t_max + u * (t_min - t_max)
    elif kind == "discrete":
        grid = torch.round(t_max + u * (t_min - t_max))
    else:
        raise UsageError(f"unknown time grid '{kind}'; choose one of: {', '.join(GRIDS)}")
    grid[0], grid[-1] = t_max, t_min  # exact endpoints despite round-trips through logSNR
    if append_zero:
        grid = torch.cat([grid, grid.new_zeros(1)])
    return grid
