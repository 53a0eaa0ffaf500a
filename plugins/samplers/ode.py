"""Deterministic solvers of the probability-flow ODE: Heun, DPM-Solver++(2M/3M), iPNDM, Euler with AFS.

All work for every schedule through the VE view of the process: with y = x / alpha and s = sigma / alpha
(= exp(-logSNR/2)) the PF-ODE of x_t = alpha x0 + sigma eps is dy/ds = (y - D(x; t)) / s, where D is the
denoiser ``model.denoise`` (Karras et al. 2022, eq. 4 with s(t) = alpha). Coefficients are float64 scalars;
states keep the noise's dtype. A grid ending in 0.0 returns the last denoised estimate (no high-order
terms into s = 0). ``afs=True`` (analytical first step, Zhou et al. 2024 "AMED", used by SFD) replaces the
first network call by the direction d = y / sqrt(1 + s^2), i.e. eps ~ normalised x at the top of the
grid, which saves one evaluation. ``model_kwargs`` are passed to ``model.denoise`` (SFD-v's step count).
The callback receives {x, i, t, denoised, nfe}.

No dynamic thresholding of x0 in DPM-Solver++: it assumes pixel data in [-1, 1], which fewstep's
models need not have (the SFD reference applies it to images; see docs/samplers.md).
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor

from core import hookimpl
from core.errors import UsageError
from core.pfode import PFODE, integrate


# -- solvers -------------------------------------------------------------------------------------------
@torch.no_grad()
def euler_afs(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None,
              afs: bool = True, model_kwargs=None):
    """Euler (DDIM) whose first step is analytical (AFS; SFD's student sampler): NFE = steps - 1."""
    ode = PFODE(model, times, cond, guidance, model_kwargs, afs)
    return integrate(ode, noise, lambda y, i: (ode.euler(y, d := ode.denoised(y, i), i), d), return_trajectory, callback)


@torch.no_grad()
def heun(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None,
         afs: bool = False, model_kwargs=None):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1 without churn): Euler predictor, then the
    trapezoidal average of the directions at both ends; the step into 0.0 stays Euler. NFE = 2 per step."""
    ode = PFODE(model, times, cond, guidance, model_kwargs, afs)

    def step(y, i):
        d0 = ode.denoised(y, i)
        y1 = ode.euler(y, d0, i)
        if ode.s[i + 1] == 0:
            return y1, d0
        s0, s1 = ode.s[i], ode.s[i + 1]
        slope0, slope1 = (y - d0) / s0, (y1 - ode.denoised(y1, i + 1)) / s1
        return y + (s1 - s0) * 0.5 * (slope0 + slope1), d0

    return integrate(ode, noise, step, return_trajectory, callback)


def _dpm_order(i: int, n: int, order: int, lower_order_final: bool, final_zero: bool) -> int:
    """Warm start (order <= steps taken + 1); with ``lower_order_final`` on grids under 15 steps, the
    last step is 1st order and the one before at most 2nd (Lu et al. 2022b, sec. 5; multistep at very
    few steps overshoots otherwise). A step into 0.0 is always 1st order."""
    k = min(order, i + 1)
    if lower_order_final and n < 15:
        k = min(k, n - i)
    if final_zero and i == n - 1:
        k = 1
    return k


def _dpmpp(model, noise, times, cond, return_trajectory, guidance, callback, afs, model_kwargs, order,
           lower_order_final):
    """DPM-Solver++ multistep in data prediction (Lu et al. 2022b): the exponential integrator
    y_{i+1} = e^{-h} y_i + int_0^h e^{-(h-u)} D(lambda_i + u) du with h = lambda_{i+1} - lambda_i,
    lambda = -log s, and D replaced by its polynomial through the last ``order`` estimates.

    2M is the paper's Algorithm 2: D ~ (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h.
    3M integrates the quadratic through D_i, D_{i-1}, D_{i-2} exactly: with phi1 = 1 - e^{-h},
    phi2 = h - phi1 and phi3 = h^2/2 - phi2 (the integrals of e^{-(h-u)} u^k/k!), and the Newton form
    D(u) = D_i + a u + c u^2 (a = slope + c h_{i-1}, c the second divided difference), the update is
    e^{-h} y + phi1 D_i + phi2 a + 2 phi3 c.
    """
    ode = PFODE(model, times, cond, guidance, model_kwargs, afs)
    hist: list[tuple[Tensor, float]] = []  # (D_j, lambda_j), newest last
    final_zero = ode.s[-1] == 0

    def step(y, i):
        d = ode.denoised(y, i)
        hist.append((d, ode.lam[i]))
        del hist[:-3]
        k = _dpm_order(i, ode.n, order, lower_order_final, final_zero)
        if k == 1:
            return ode.euler(y, d, i), d
        h = ode.lam[i + 1] - ode.lam[i]
        eh = math.exp(-h)
        phi1 = -math.expm1(-h)
        (d1, l1), (d0, l0) = hist[-2], hist[-1]
        h1 = l0 - l1
        if k == 2:
            r = h1 / h
            return eh * y + phi1 * ((1 + 0.5 / r) * d0 - (0.5 / r) * d1), d
        d2, l2 = hist[-3]
        h2 = l1 - l2
        slope1, slope2 = (d0 - d1) / h1, (d1 - d2) / h2
        c = (slope1 - slope2) / (h1 + h2)
        a = slope1 + c * h1
        phi2 = h - phi1
        phi3 = 0.5 * h * h - phi2
        return eh * y + phi1 * d0 + phi2 * a + (2 * phi3) * c, d

    return integrate(ode, noise, step, return_trajectory, callback)


@torch.no_grad()
def dpmpp_2m(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None,
             afs: bool = False, lower_order_final: bool = True, model_kwargs=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): 2nd-order multistep in data prediction. NFE = steps."""
    return _dpmpp(model, noise, times, cond, return_trajectory, guidance, callback, afs, model_kwargs, 2,
                  lower_order_final)


@torch.no_grad()
def dpmpp_3m(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None,
             afs: bool = False, lower_order_final: bool = True, model_kwargs=None):
    """DPM-Solver++(3M): 3rd-order multistep exponential integrator in data prediction (SFD's teacher
    solver). NFE = steps."""
    return _dpmpp(model, noise, times, cond, return_trajectory, guidance, callback, afs, model_kwargs, 3,
                  lower_order_final)


# Adams-Bashforth coefficients for equal steps, newest direction first (iPNDM warm-starts with 1..3).
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def ipndm(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None,
          afs: bool = False, max_order: int = 4, model_kwargs=None):
    """Improved PNDM (Zhang & Chen 2023, DEIS sec. 4): Adams-Bashforth on d = (y - D)/s in s with the
    equal-step coefficients of order min(i + 1, max_order) and lower-order warm start. NFE = steps."""
    if max_order not in _AB:
        raise UsageError(f"ipndm max_order must be 1-4, got {max_order}")
    ode = PFODE(model, times, cond, guidance, model_kwargs, afs)
    slopes: list[Tensor] = []

    def step(y, i):
        d = ode.denoised(y, i)
        if ode.s[i + 1] == 0:
            return d, d
        slopes.append((y - d) / ode.s[i])
        del slopes[:-max_order]
        coef = _AB[min(i + 1, max_order)]
        direction = sum(c * g for c, g in zip(coef, reversed(slopes)))
        return y + (ode.s[i + 1] - ode.s[i]) * direction, d

    return integrate(ode, noise, step, return_trajectory, callback)


# -- registration ----------------------------------------------------------------------------------------
@attrs.define(kw_only=True)
class ODEConfig:
    afs: bool = attrs.field(default=False, metadata={"doc": "analytical first step: saves one network call"})


@attrs.define(kw_only=True)
class EulerAFSConfig:
    afs: bool = attrs.field(default=True, metadata={"doc": "analytical first step (off: plain Euler/DDIM)"})


@attrs.define(kw_only=True)
class DPMConfig(ODEConfig):
    lower_order_final: bool = attrs.field(default=True,
                                          metadata={"doc": "1st/2nd order at the last steps (< 15 steps)"})


@attrs.define(kw_only=True)
class IPNDMConfig(ODEConfig):
    max_order: int = attrs.field(default=4, validator=attrs.validators.in_((1, 2, 3, 4)), metadata={"doc": "1-4"})


SAMPLERS = {"euler-afs": (euler_afs, EulerAFSConfig), "heun": (heun, ODEConfig), "dpmpp-2m": (dpmpp_2m, DPMConfig),
            "dpmpp-3m": (dpmpp_3m, DPMConfig), "ipndm": (ipndm, IPNDMConfig)}


@hookimpl
def register_samplers(register):
    for name, (fn, config) in SAMPLERS.items():
        register(name, fn, config=config)
