"""The ancestral sampler (Salimans et al. 2024, Alg. 1) and the posterior it draws from.

References: the Gaussian posterior q(z_s | z_t, x) in closed form (standard algebra, moment_matching.md
sec. 3), the forward marginal q(z_s | x) that every DDIM(eta) step must preserve, the euler/DDIM sampler,
and exact samples of the mixture teacher.
"""

from __future__ import annotations

import math

import pytest
import torch

from core import ops
from core.errors import UsageError
from core.metrics import energy_distance
from core.schedules import make_schedule
from plugins.gmm import GaussianMixtureTeacher, GMMConfig
from core.timesteps import fraction_grid
from plugins.samplers.ancestral import ancestral
from plugins.samplers.basic import euler

SCHEDULES = {"vp-cosine": (0.7, 0.4), "edm": (5.0, 0.8), "flow": (0.8, 0.3)}  # (t, s) pairs


def closed_form(sched, t, s, z_t, x):
    """mu and var of q(z_s | z_t, x): alpha_{t|s} = alpha_t/alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2."""
    at, st, as_, ss = (float(f(torch.tensor(v, dtype=torch.float64))) for f, v in
                       ((sched.alpha, t), (sched.sigma, t), (sched.alpha, s), (sched.sigma, s)))
    a_ts = at / as_
    var_ts = st**2 - a_ts**2 * ss**2
    mean = a_ts * ss**2 / st**2 * z_t + as_ * var_ts / st**2 * x
    return mean, var_ts * ss**2 / st**2, (at, st, as_, ss)


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_posterior_matches_closed_form_monte_carlo(kind):
    sched = make_schedule(kind)
    t, s = SCHEDULES[kind]
    n, d = 200_000, 3
    x = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    z_t = torch.tensor([1.5, 0.2, -2.0], dtype=torch.float64)
    mean, var, (at, st, as_, ss) = closed_form(sched, t, s, z_t, x)
    draws = ops.posterior_sample(z_t.expand(n, d), x.expand(n, d), at, st, as_, ss, torch.randn(n, d, dtype=torch.float64))
    se = math.sqrt(var / n)
    assert torch.allclose(draws.mean(0), mean, atol=5 * se)
    assert torch.allclose(draws.var(0), torch.full((d,), var, dtype=torch.float64), rtol=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_every_eta_preserves_the_forward_marginal(kind, eta):
    """z_t ~ q(z_t | x), z_s ~ DDIM(eta) posterior  =>  z_s ~ q(z_s | x) = N(alpha_s x, sigma_s^2)."""
    sched = make_schedule(kind)
    t, s = SCHEDULES[kind]
    n = 200_000
    x = torch.tensor([0.5, -0.25], dtype=torch.float64)
    _, _, (at, st, as_, ss) = closed_form(sched, t, s, torch.zeros(2, dtype=torch.float64), x)
    z_t = at * x + st * torch.randn(n, 2, dtype=torch.float64)
    z_s = ops.posterior_sample(z_t, x.expand(n, 2), at, st, as_, ss, torch.randn(n, 2, dtype=torch.float64), eta)
    assert torch.allclose(z_s.mean(0), as_ * x, atol=5 * ss / math.sqrt(n))
    assert torch.allclose(z_s.std(0), torch.full((2,), ss, dtype=torch.float64), rtol=5 / math.sqrt(n))


def test_eta_zero_is_ddim():
    """eta = 0 walks the same path as the euler (DDIM) sampler."""
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8", schedule="vp-cosine"))
    noise = torch.randn(500, 2)
    times = fraction_grid(teacher.schedule, 6)
    assert torch.allclose(ancestral(teacher, noise, times, eta=0.0), euler(teacher, noise, times), atol=1e-5)


def test_fraction_grid_is_i_over_k_mapped_by_the_schedule():
    vp = make_schedule("vp-cosine")
    g = fraction_grid(vp, 4)
    expected = [vp.t_min + u * (vp.t_max - vp.t_min) for u in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    assert torch.allclose(g, torch.tensor(expected, dtype=torch.float64))
    edm = make_schedule("edm")
    karras = [(80 ** (1 / 7) + u * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for u in (0, 0.25, 0.5, 0.75)]
    assert torch.allclose(fraction_grid(edm, 4)[:-1], torch.tensor(karras, dtype=torch.float64))
    with pytest.raises(UsageError, match="at least 1 step"):
        fraction_grid(vp, 0)


@pytest.mark.parametrize("preset,kind", [("ring8", "edm"), ("hd16", "vp-cosine")])
def test_exact_teacher_reproduces_the_mixture_at_many_steps(preset, kind):
    teacher = GaussianMixtureTeacher(GMMConfig(preset=preset, schedule=kind))
    n = 3000
    reference = teacher.sample_exact(n)
    floor = energy_distance(teacher.sample_exact(n), reference)  # sampling noise of the metric itself
    many = energy_distance(ancestral(teacher, torch.randn(n, *teacher.data_shape), fraction_grid(teacher.schedule, 64)),
                           reference)
    few = energy_distance(ancestral(teacher, torch.randn(n, *teacher.data_shape), fraction_grid(teacher.schedule, 2)),
                          reference)
    assert many < abs(floor) + 0.005
    assert few > 10 * max(many, 0.003)  # the metric does see the gap


def test_registered_and_usable_from_the_sample_cli(tmp_path):
    import numpy as np

    from core.registry import get_registry
    from core.sample import main

    assert get_registry().get("sampler", "ancestral").factory is ancestral
    out = tmp_path / "s.npz"
    assert main(["teacher=gmm", "sampler=ancestral", "sampler.eta=0.5", "steps=8", "num=64", f"out={out}"]) == 0
    assert np.load(out)["samples"].shape == (64, 2)
    assert main(["teacher=gmm", "sampler=ancestral", "sampler.eta=2", "num=8", f"out={out}"]) == 2
