"""ODE samplers against references that share no code with them.

- DPM-Solver++(3M) (Lu et al. 2022b) written out step by step on a non-uniform grid: the exponential
  integrator x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} int_0^h e^{-(h-u)} P(lambda_i + u) du with P the
  Lagrange interpolant of the last three denoised estimates in lambda = log(alpha/sigma), the integral done
  by Gauss-Legendre quadrature; warm start with a DDIM step and an Algorithm-2 step.
- Convergence orders fitted against the closed-form PF-ODE solution of a Gaussian data distribution,
  x0 ~ N(mu, diag c^2): in VE coordinates y = x/alpha, s = sigma/alpha,
  y(s) - mu = (y(s0) - mu) sqrt((c^2 + s^2) / (c^2 + s0^2)).
Samplers are looked up by their registered names.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.registry import get_registry
from core.schedules import make_schedule
from core.timesteps import make_grid

# x_t = alpha x0 + sigma eps, written out per schedule (independent of core.schedules)
ALPHA_SIGMA = {"edm": lambda t: (torch.ones_like(t), t),
               "vp-cosine": lambda t: (torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)),
               "flow": lambda t: (1 - t, t)}


pytestmark = pytest.mark.usefixtures("one_thread")


def sampler(name):
    return get_registry().get("sampler", name).factory


class Gaussian:
    """Exact denoiser of x0 ~ N(mu, diag c^2) on a schedule: E[x0 | x_t] = mu + alpha c^2 (x_t - alpha mu) /
    (alpha^2 c^2 + sigma^2), in float64. Several scales c make the flow non-trivial in every coordinate."""

    def __init__(self, schedule="edm", mu=(0.3, -0.5, 0.0, 1.0), c=(0.5, 0.1, 1.0, 0.03)):
        self.kind, self.schedule = schedule, make_schedule(schedule)
        self.mu = torch.tensor(mu, dtype=torch.float64)
        self.c = torch.tensor(c, dtype=torch.float64)
        self.calls = 0

    def denoise(self, x, t, cond=None, **kwargs):
        self.calls += 1
        a, s = (v[:, None] for v in ALPHA_SIGMA[self.kind](t.double()))
        c2 = self.c**2
        return (self.mu + a * c2 * (x.double() - a * self.mu) / (a * a * c2 + s * s)).to(x.dtype)

    def exact(self, z, t0, t1):
        """The PF-ODE solution at t1 from x(t0) = sigma(t0) z, in x space."""
        (a0, s0), (a1, s1) = (ALPHA_SIGMA[self.kind](torch.tensor(t, dtype=torch.float64)) for t in (t0, t1))
        v0, v1 = s0 / a0, s1 / a1
        y0 = s0 * z / a0
        y1 = self.mu + (y0 - self.mu) * torch.sqrt((self.c**2 + v1**2) / (self.c**2 + v0**2))
        return a1 * y1


# -- DPM-Solver++(3M) step by step -----------------------------------------------------------------------

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(20)


def _integral(h, f):
    """int_0^h f(u) du by 20-point Gauss-Legendre (exact for e^{-(h-u)} P(u) to float64 at these h)."""
    u = 0.5 * h * (torch.tensor(_GL_NODES, dtype=torch.float64) + 1)
    w = 0.5 * h * torch.tensor(_GL_WEIGHTS, dtype=torch.float64)
    return sum(wk * f(float(uk)) for uk, wk in zip(u, w))


def _lagrange(nodes, values):
    def p(x):
        total = 0
        for j, (xj, vj) in enumerate(zip(nodes, values)):
            basis = math.prod((x - xm) / (xj - xm) for m, xm in enumerate(nodes) if m != j)
            total = total + basis * vj
        return total

    return p


def dpmpp_3m_reference(model, z, grid):
    """DPM-Solver++(3M) without lower-order final steps, in x space. Step 0: DDIM; step 1: Algorithm 2
    (D~ = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h); later steps: exact integral of the quadratic."""
    a, s = ALPHA_SIGMA[model.kind](grid)
    lam = torch.log(a / s)
    x = s[0] * z
    ds, lams = [], []
    for i in range(len(grid) - 1):
        d = model.denoise(x, grid[i].expand(z.shape[0]))
        ds.append(d)
        lams.append(float(lam[i]))
        h = float(lam[i + 1] - lam[i])
        if i == 0:
            x = s[i + 1] / s[i] * x - a[i + 1] * math.expm1(-h) * d
        elif i == 1:
            r = (lams[1] - lams[0]) / h
            dt = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * ds[0]
            x = s[i + 1] / s[i] * x - a[i + 1] * math.expm1(-h) * dt
        else:
            p = _lagrange([u - lams[-1] for u in lams[-3:]], ds[-3:])
            x = s[i + 1] / s[i] * x + a[i + 1] * _integral(h, lambda u: math.exp(-(h - u)) * p(u))
    return x


@pytest.mark.parametrize("schedule,grid", [
    ("vp-cosine", [0.97, 0.9, 0.75, 0.6, 0.52, 0.3, 0.22, 0.1, 0.04]),
    ("edm", [60.0, 21.0, 9.0, 2.5, 1.7, 0.4, 0.09, 0.05, 0.01]),
])
def test_dpmpp_3m_step_by_step_on_a_non_uniform_grid(schedule, grid):
    model = Gaussian(schedule)
    z = torch.randn(16, 4, dtype=torch.float64)
    grid = torch.tensor(grid, dtype=torch.float64)
    want = dpmpp_3m_reference(model, z, grid)
    out, traj = sampler("dpmpp-3m")(model, z, grid, lower_order_final=False, return_trajectory=True)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    for k in range(1, len(grid)):  # and every intermediate state
        torch.testing.assert_close(traj[k], dpmpp_3m_reference(model, z, grid[:k + 1]), rtol=1e-10, atol=1e-12)


def test_dpmpp_3m_third_order_term_is_visible():
    """On this grid the third-order term changes the answer by far more than the tolerance above, so a wrong
    coefficient cannot hide: compare with the same solver capped at order 2 (dpmpp-2m)."""
    model = Gaussian("vp-cosine")
    z = torch.randn(16, 4, dtype=torch.float64)
    grid = torch.tensor([0.97, 0.9, 0.75, 0.6, 0.52, 0.3, 0.22, 0.1, 0.04], dtype=torch.float64)
    three = sampler("dpmpp-3m")(model, z, grid, lower_order_final=False)
    two = sampler("dpmpp-2m")(model, z, grid, lower_order_final=False)
    assert float((three - two).abs().max()) > 1e-4


# Adams-Bashforth weights for equal steps, newest slope first (any numerical-analysis text, e.g. Hairer I.III.1)
ADAMS_BASHFORTH = [[1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_step_by_step(max_order):
    """iPNDM (Zhang & Chen 2023): y_{i+1} = y_i + (s_{i+1} - s_i) sum_j b_j d_{i-j}, d = (y - D)/s in VE
    coordinates, with the order-min(i + 1, max_order) weights (lower-order warm start)."""
    model = Gaussian("vp-cosine")
    z = torch.randn(16, 4, dtype=torch.float64)
    grid = torch.tensor([0.97, 0.9, 0.75, 0.6, 0.52, 0.3, 0.22, 0.1], dtype=torch.float64)
    a, s = ALPHA_SIGMA["vp-cosine"](grid)
    v = s / a
    y = v[0] * z
    slopes = []
    for i in range(len(grid) - 1):
        slopes.insert(0, (y - model.denoise(a[i] * y, grid[i].expand(16))) / v[i])
        weights = ADAMS_BASHFORTH[min(i + 1, max_order) - 1]
        y = y + (v[i + 1] - v[i]) * sum(b * d for b, d in zip(weights, slopes))
    out = sampler("ipndm")(model, z, grid, max_order=max_order)
    torch.testing.assert_close(out, a[-1] * y, rtol=1e-10, atol=1e-12)


# -- orders against the closed-form Gaussian flow ------------------------------------------------------

def _fitted_order(name, schedule, ns, **options):
    model = Gaussian(schedule)
    z = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errs = []
    for n in ns:
        grid = make_grid(model.schedule, n + 1, append_zero=False)
        out = sampler(name)(model, z, grid, **options)
        exact = model.exact(z, float(grid[0]), float(grid[-1]))
        errs.append(float((out - exact).abs().max()))
    x = np.log(np.array(ns, dtype=np.float64))
    y = -np.log(np.array(errs))
    return float(np.polyfit(x, y, 1)[0]), errs


# expected order p of each solver; the slope fitted over 32, 64, 128 Karras steps must lie in [p - 0.15, p + 0.2]
# (measured: 0.97-0.98, 2.03-2.11, 3.07-3.08). iPNDM's equal-step Adams-Bashforth coefficients are second order
# on a grid whose step ratio varies (measured 1.92-1.98).
ORDERS = {"euler": 1, "euler-afs": 1, "heun": 2, "dpmpp-2m": 2, "dpmpp-3m": 3, "ipndm": 2}
OPTIONS = {"euler-afs": {"afs": False}, "dpmpp-2m": {"lower_order_final": False},
           "dpmpp-3m": {"lower_order_final": False}}


@pytest.mark.parametrize("name", list(ORDERS))
@pytest.mark.parametrize("schedule", ["edm", "vp-cosine"])
def test_convergence_order_against_the_closed_form_gaussian_flow(name, schedule):
    order, errs = _fitted_order(name, schedule, [32, 64, 128], **OPTIONS.get(name, {}))
    p = ORDERS[name]
    assert p - 0.15 <= order <= p + 0.2, (name, order, errs)
