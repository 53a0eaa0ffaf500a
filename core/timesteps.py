"""Time grids for samplers: decreasing 1-D float64 tensors in the schedule's own units.

A grid may end in the sentinel 0.0, meaning "clean data": the last step then returns the denoised
estimate (as EDM and k-diffusion do with sigma = 0). The continuous kinds are built in VE-sigma space
(sigma/alpha, i.e. exp(-logSNR/2)) and mapped to each schedule's t, so "polynomial, rho=7" means the
same spacing for an EDM, VP or flow model. Kinds (Zhou et al. 2024, sec. 3 and the diff-solvers toolbox):

- ``polynomial``: EDM's rho-spacing, s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho
  (Karras et al. 2022, eq. 5), rho = 7 by default;
- ``logsnr``: uniform in logSNR (= uniform in log sigma on EDM);
- ``uniform``: uniform in the schedule's own t (``time-uniform``; uniform sigma on EDM);
- ``discrete``: integer timesteps of a ``vp-discrete`` (SD-style) schedule, uniform in t^(1/rho) with
  rho = 1 by default, then rounded;
- ``explicit``: the given ``times``, used as they are.

``fraction_grid`` is moment matching's grid t = i/k (Salimans et al. 2024), mapped through the schedule;
``step_fraction`` moves a few-step generator's grid on EDM so that the steps after the first refine.
``TimeGrid`` bundles a kind and its settings into one first-class object; ``nested_grids`` builds the
coarse/fine pair of trajectory distillation (SFD's student grid and its M-times refined teacher grid).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from core.errors import UsageError
from core.schedules import NoiseSchedule

GRIDS = ("polynomial", "logsnr", "uniform", "discrete", "explicit")
ALIASES = {"time-uniform": "uniform", "time_uniform": "uniform", "logsnr-uniform": "logsnr", "karras": "polynomial"}
DEFAULT_RHO = {"polynomial": 7.0, "discrete": 1.0}


def ve_sigma(schedule: NoiseSchedule, t) -> Tensor:
    """sigma/alpha = exp(-logSNR/2): the noise level of the equivalent variance-exploding process."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.exp(-schedule.logsnr(t) / 2)


def _from_ve_sigma(schedule: NoiseSchedule, s: Tensor) -> Tensor:
    return schedule.t_from_logsnr(-2 * torch.log(s)).to(torch.float64)


def canonical_kind(kind: str) -> str:
    kind = ALIASES.get(kind, kind)
    if kind not in GRIDS:
        raise UsageError(f"unknown time grid '{kind}'; choose one of: {', '.join(GRIDS)}")
    return kind


def _check_explicit(times) -> Tensor:
    if times is None:
        raise UsageError("grid 'explicit' needs times=[...]")
    grid = torch.as_tensor(times, dtype=torch.float64).flatten()
    if grid.numel() < 2:
        raise UsageError(f"explicit times need at least 2 values (start and end), got {grid.tolist()}")
    if not bool((grid[:-1] > grid[1:]).all()):
        raise UsageError(f"explicit times must decrease strictly, got {grid.tolist()}")
    if float(grid[-1]) < 0:
        raise UsageError(f"explicit times must be >= 0 (0 means clean data), got {grid.tolist()}")
    return grid


def make_grid(schedule: NoiseSchedule, points: int, kind: str = "polynomial", rho: float | None = None,
              t_min: float | None = None, t_max: float | None = None, times=None,
              append_zero: bool = True) -> Tensor:
    """``points`` timestamps from t_max down to t_min (plus the clean sentinel 0.0 if ``append_zero``).

    With ``append_zero`` a grid of ``points`` timestamps costs ``points`` denoiser calls in Euler;
    without it, ``points - 1`` (the last state is the output, as in SFD). When t_min is itself 0 (a
    ``vp-discrete`` schedule's first timestep) the grid is built with ``points + 1`` timestamps so that
    its final 0 serves as the sentinel and the cost stays ``points`` calls. ``explicit`` grids are
    returned as given. ``rho`` defaults to 7 (polynomial) or 1 (discrete).
    """
    kind = canonical_kind(kind)
    if kind == "explicit":
        return _check_explicit(times)
    t_min = schedule.t_min if t_min is None else float(t_min)
    t_max = schedule.t_max if t_max is None else float(t_max)
    rho = DEFAULT_RHO.get(kind, 7.0) if rho is None else float(rho)
    if points < 1:
        raise UsageError(f"a time grid needs at least 1 point, got {points}")
    if not t_max > t_min >= 0:
        raise UsageError(f"a time grid needs t_max > t_min >= 0, got t_max={t_max}, t_min={t_min}")
    if rho <= 0:
        raise UsageError(f"rho must be > 0, got {rho}")
    zero_end = append_zero and t_min == 0
    if zero_end:
        points, append_zero = points + 1, False
    u = torch.linspace(0, 1, points, dtype=torch.float64) if points > 1 else torch.zeros(1, dtype=torch.float64)
    if kind == "polynomial":
        hi, lo = ve_sigma(schedule, t_max) ** (1 / rho), ve_sigma(schedule, t_min) ** (1 / rho)
        grid = _from_ve_sigma(schedule, (hi + u * (lo - hi)) ** rho)
    elif kind == "logsnr":
        hi, lo = (schedule.logsnr(torch.tensor(v, dtype=torch.float64)) for v in (t_max, t_min))
        grid = schedule.t_from_logsnr(hi + u * (lo - hi)).to(torch.float64)
    elif kind == "uniform":
        grid = t_max + u * (t_min - t_max)
    else:  # discrete
        if not hasattr(schedule, "alphas_cumprod"):
            raise UsageError(f"grid 'discrete' is for integer-timestep (vp-discrete) schedules, not '{schedule.name}'; "
                             "use polynomial, logsnr or uniform")
        hi, lo = t_max ** (1 / rho), t_min ** (1 / rho)
        grid = torch.round((hi + u * (lo - hi)) ** rho)
        if points > 1 and not bool((grid[:-1] > grid[1:]).all()):
            raise UsageError(f"a discrete grid of {points} points repeats integer timesteps in [{t_min}, {t_max}] "
                             f"at rho={rho}; use fewer points or a smaller rho")
    grid[0], grid[-1] = t_max, (t_min if points > 1 else t_max)  # exact endpoints despite logSNR round-trips
    if append_zero:
        grid = torch.cat([grid, grid.new_zeros(1)])
    return grid


def nested_grids(schedule: NoiseSchedule, points: int, substeps: int, kind: str = "polynomial",
                 rho: float | None = None, t_min: float | None = None, t_max: float | None = None,
                 times=None) -> tuple[Tensor, Tensor]:
    """(coarse, fine): ``points`` coarse timestamps and a fine grid with ``substeps`` extra timestamps in
    every coarse interval, so that ``fine[::substeps + 1] == coarse`` exactly (SFD sec. 3.1: the teacher
    grid has N_tea = (M+1)(N-1)+1 points). Neither ends in the 0.0 sentinel.

    For the continuous kinds the fine grid is the same kind with N_tea points, which nests because the
    kinds are uniform in a transformed coordinate; an explicit coarse grid is refined uniformly in
    sigma^(1/rho) (rho = 7 by default, 1 gives uniform-in-sigma sub-steps).
    """
    kind = canonical_kind(kind)
    if substeps < 0:
        raise UsageError(f"substeps must be >= 0, got {substeps}")
    k = substeps + 1
    if kind == "explicit":
        coarse = _check_explicit(times)
        r = 7.0 if rho is None else float(rho)
        s = ve_sigma(schedule, coarse) ** (1 / r)
        u = torch.arange(k, dtype=torch.float64) / k
        inner = (s[:-1, None] + u[None] * (s[1:] - s[:-1])[:, None]) ** r
        fine = torch.cat([_from_ve_sigma(schedule, inner.flatten()), coarse[-1:]])
        fine[::k] = coarse  # exact coarse points
        return coarse, fine
    if points < 2:
        raise UsageError(f"nested grids need at least 2 coarse points, got {points}")
    fine = make_grid(schedule, k * (points - 1) + 1, kind, rho, t_min, t_max, append_zero=False)
    return fine[::k].clone(), fine


@attrs.frozen
class TimeGrid:
    """A time schedule as a value: ``TimeGrid("logsnr")(schedule, 8)`` is ``make_grid(schedule, 8, "logsnr")``.

    JSON-able through ``attrs.asdict``; ``t_min``/``t_max`` default to the schedule's range.
    """

    kind: str = attrs.field(default="polynomial", converter=canonical_kind)
    rho: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    times: tuple[float, ...] | None = attrs.field(default=None, converter=lambda v: None if v is None else tuple(
        float(x) for x in v))

    def __call__(self, schedule: NoiseSchedule, points: int = 0, append_zero: bool = True) -> Tensor:
        return make_grid(schedule, points, self.kind, self.rho, self.t_min, self.t_max, self.times, append_zero)

    def nested(self, schedule: NoiseSchedule, points: int, substeps: int) -> tuple[Tensor, Tensor]:
        return nested_grids(schedule, points, substeps, self.kind, self.rho, self.t_min, self.t_max, self.times)


def fraction_grid(schedule, steps: int, refine: bool = False) -> Tensor:
    """The paper's grid t = i/k, i = k..1 (plus the clean sentinel 0.0), in the schedule's units.

    The paper's time runs over [0, 1]; other schedules map the fraction i/k through
    ``schedule.t_from_fraction`` (Karras rho-spacing on EDM, linear in t on VP/flow, the timestep on
    vp-discrete), so i/k = 1 is the schedule's noisiest trained time. ``refine``: through ``step_fraction``
    first (EDM: sigma = 80, 2.5, 0.74, 0.17 for k = 4).
    """
    if steps < 1:
        raise UsageError(f"a fraction grid needs at least 1 step, got {steps}")
    u = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    if refine:
        u = step_fraction(schedule, u, steps)
    times = torch.as_tensor(schedule.t_from_fraction(u), dtype=torch.float64)
    return torch.cat([times, times.new_zeros(1)])


def step_fraction(schedule, u, steps: int) -> Tensor:
    """Where fraction u of a k-step generator's grid (step i at i/k) goes on ``schedule``, so that the steps after
    the first refine rather than start over. EDM's rho-spacing puts the upper fractions at nearly pure noise
    (3/4 is sigma = 17.5, 25 sigma_data), so on EDM u is warped piecewise-linearly: 0 and 1 stay, the grid points
    i/k (0 < i < k) go evenly from 1/4 (i = 1) up to 1/2 (i = k - 1), e.g. 1, 3/4, 1/2, 1/4 -> 1, 1/2, 3/8, 1/4.
    Other schedules (linear in t, SDXL's 999/749/499/249 among them) and k <= 2 keep u. Measured for DMD2 and
    MM in docs/methods/quality.md, eleventh and twelfth passes."""
    u = torch.as_tensor(u, dtype=torch.float64)
    if schedule.name != "edm" or steps <= 2:
        return u
    knots = torch.tensor([0.0, *(0.25 + 0.25 * (i - 1) / (steps - 2) for i in range(1, steps)), 1.0],
                         dtype=torch.float64, device=u.device)
    scaled = u.clamp(0, 1) * steps
    i = scaled.floor().clamp(max=steps - 1).long()
    return knots[i] + (scaled - i) * (knots[i + 1] - knots[i])
