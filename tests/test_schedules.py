"""Noise schedules and parameterisation conversions against their closed forms (float64)."""

import math

import pytest
import torch

from core import ops
from core.parameterization import PREDICTIONS, from_x0, precondition, to_x0, x0_to_score
from core.schedules import EDMSchedule, FlowSchedule, VPCosineSchedule, VPDiscreteSchedule, schedule_from_config

BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
SCHEDULES = [EDMSchedule(), VPCosineSchedule(), FlowSchedule(), VPDiscreteSchedule(torch.cumprod(1 - BETAS, 0))]


def _times(s, n=7):
    return s.t_min + torch.rand(n, dtype=torch.float64) * (s.t_max - s.t_min)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.name)
def test_logsnr_is_log_alpha2_over_sigma2_and_inverts(s):
    t = _times(s)
    lam = s.logsnr(t)
    torch.testing.assert_close(lam, torch.log(s.alpha(t) ** 2 / s.sigma(t) ** 2))
    torch.testing.assert_close(s.t_from_logsnr(lam), t, rtol=1e-6, atol=1e-6)
    assert bool((lam[:-1] != lam[1:]).all())


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.name)
def test_fraction_endpoints_and_monotone(s):
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    t = s.t_from_fraction(u)
    assert math.isclose(float(t[0]), s.t_min, abs_tol=1e-9) and math.isclose(float(t[-1]), s.t_max, rel_tol=1e-9)
    assert bool((t[1:] > t[:-1]).all())
    assert bool((s.logsnr(t)[1:] < s.logsnr(t)[:-1]).all())  # larger t, more noise


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.name)
def test_schedule_config_round_trip(s):
    t = _times(s)
    torch.testing.assert_close(schedule_from_config(s.config()).sigma(t), s.sigma(t))


def test_known_values():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    torch.testing.assert_close(VPCosineSchedule().alpha(t), torch.cos(math.pi / 2 * t))
    torch.testing.assert_close(FlowSchedule().alpha(t), 1 - t)
    torch.testing.assert_close(EDMSchedule().sigma(t), t)
    ac = torch.cumprod(1 - BETAS, 0)
    vp = VPDiscreteSchedule(ac)
    k = torch.tensor([0.0, 10.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(vp.alpha(k), ac[k.long()].sqrt())
    torch.testing.assert_close(vp.sigma(k), (1 - ac[k.long()]).sqrt())
    # fractional timesteps interpolate log(alpha_bar) linearly
    half = vp.alpha(torch.tensor([10.5], dtype=torch.float64)) ** 2
    torch.testing.assert_close(half, (ac[10] * ac[11]).sqrt().view(1))


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_round_trip(s, prediction):
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = _times(s, 5)
    a, sg = s.alpha(t), s.sigma(t)
    x_t = ops.add_noise(x0, eps, a, sg)
    # the exact network output for this (x0, eps) pair, written from the definitions
    target = {"x0": x0, "eps": eps, "v": a[:, None] * eps - sg[:, None] * x0, "flow": eps - x0}[prediction]
    torch.testing.assert_close(from_x0(x0, x_t, a, sg, prediction), target)
    torch.testing.assert_close(to_x0(target, x_t, a, sg, prediction), x0)


def test_score_of_gaussian_data():
    """x0 ~ N(0, s^2): E[x0|x_t] = a s^2 x_t / (a^2 s^2 + sigma^2) and the score is -x_t / (a^2 s^2 + sigma^2)."""
    s2, a, sg = 0.7, torch.tensor([0.8]), torch.tensor([0.6])
    x_t = torch.randn(4, 1, dtype=torch.float64)
    x0 = a * s2 * x_t / (a**2 * s2 + sg**2)
    torch.testing.assert_close(x0_to_score(x0, x_t, a, sg), -x_t / (a**2 * s2 + sg**2))


def test_edm_preconditioning_matches_karras_table():
    sigma, sd = torch.tensor([0.3, 2.0], dtype=torch.float64), 0.5
    like = torch.zeros(2, 1, dtype=torch.float64)
    c_in, c_skip, c_out = precondition(torch.ones(2, dtype=torch.float64), sigma, sd, like)
    torch.testing.assert_close(c_skip.flatten(), sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out.flatten(), sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in.flatten(), 1 / (sigma**2 + sd**2).sqrt())
