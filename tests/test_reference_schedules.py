"""Noise schedules and time grids against formulas written out here (float64), for non-default settings so that
a wrong constant or a swapped bound cannot hide behind a default (what the mutation run of core.schedules and
core.timesteps found untested)."""

from __future__ import annotations

import math

import pytest
import torch

from core.errors import UsageError
from core.schedules import (EDMSchedule, FlowSchedule, VPCosineSchedule, VPDiscreteSchedule, make_schedule,
                            schedule_from_config)
from core.timesteps import TimeGrid, fraction_grid, make_grid, nested_grids

F64 = torch.float64
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
AC = torch.cumprod(1 - BETAS, 0)


def test_edm_closed_forms_with_non_default_settings():
    s = EDMSchedule(sigma_min=0.01, sigma_max=20.0, rho=3.0)
    t = torch.tensor([0.01, 0.3, 5.0, 20.0], dtype=F64)
    torch.testing.assert_close(s.alpha(t), torch.ones(4, dtype=F64))
    torch.testing.assert_close(s.sigma(t), t)
    torch.testing.assert_close(s.logsnr(t), -2 * torch.log(t))
    torch.testing.assert_close(s.t_from_logsnr(-2 * torch.log(t)), t)
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)  # Karras et al. 2022 eq. 5, increasing
    karras = (0.01 ** (1 / 3) + u * (20.0 ** (1 / 3) - 0.01 ** (1 / 3))) ** 3
    torch.testing.assert_close(s.t_from_fraction(u), karras)
    assert s.config() == {"kind": "edm", "sigma_min": 0.01, "sigma_max": 20.0, "rho": 3.0}
    assert (s.t_min, s.t_max, s.rho) == (0.01, 20.0, 3.0)


def test_edm_defaults_are_karras():
    s = EDMSchedule()
    assert (s.t_min, s.t_max, s.rho) == (0.002, 80.0, 7.0)


@pytest.mark.parametrize("make", [EDMSchedule, FlowSchedule], ids=["edm", "flow"])
def test_sigma_is_a_new_tensor(make):
    """sigma(t) = t on EDM and flow; the returned tensor must not alias t (samplers update it in place)."""
    t = torch.tensor([0.3, 0.6], dtype=F64)
    sig = make().sigma(t)
    sig.mul_(2)
    torch.testing.assert_close(t, torch.tensor([0.3, 0.6], dtype=F64))


def test_vp_cosine_closed_forms():
    s = VPCosineSchedule(t_min=0.01, t_max=0.9)
    t = torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=F64)
    torch.testing.assert_close(s.alpha(t), torch.cos(math.pi * t / 2))
    torch.testing.assert_close(s.sigma(t), torch.sin(math.pi * t / 2))
    torch.testing.assert_close(s.logsnr(t), torch.log(torch.cos(math.pi * t / 2) ** 2 / torch.sin(math.pi * t / 2) ** 2))
    lam = torch.tensor([-6.0, 0.0, 3.0], dtype=F64)
    # alpha/sigma = cot(pi t/2) = exp(lam/2)
    torch.testing.assert_close(s.t_from_logsnr(lam), 2 / math.pi * torch.atan(torch.exp(-lam / 2)))
    torch.testing.assert_close(s.t_from_logsnr(torch.tensor(0.0, dtype=F64)), torch.tensor(0.5, dtype=F64))
    u = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    torch.testing.assert_close(s.t_from_fraction(u), 0.01 + u * 0.89)
    assert s.config() == {"kind": "vp-cosine", "t_min": 0.01, "t_max": 0.9}
    d = VPCosineSchedule()
    assert (d.t_min, d.t_max) == (1e-3, 0.999)


def test_flow_closed_forms():
    s = FlowSchedule(t_min=0.05, t_max=0.8)
    t = torch.tensor([0.05, 0.25, 0.5, 0.8], dtype=F64)
    torch.testing.assert_close(s.alpha(t), 1 - t)
    torch.testing.assert_close(s.sigma(t), t)
    torch.testing.assert_close(s.logsnr(t), 2 * torch.log((1 - t) / t))
    torch.testing.assert_close(s.t_from_logsnr(2 * torch.log((1 - t) / t)), t)
    torch.testing.assert_close(s.t_from_logsnr(torch.tensor(0.0, dtype=F64)), torch.tensor(0.5, dtype=F64))
    u = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    torch.testing.assert_close(s.t_from_fraction(u), 0.05 + u * 0.75)
    assert s.config() == {"kind": "flow", "t_min": 0.05, "t_max": 0.8}
    d = FlowSchedule()
    assert (d.t_min, d.t_max) == (1e-3, 1 - 1e-3)


def test_python_numbers_are_float64_times():
    for s in (EDMSchedule(), VPCosineSchedule(), FlowSchedule()):
        assert s.sigma(0.5).dtype == F64 and s.alpha(0.5).dtype == F64 and s.logsnr(0.5).dtype == F64
        assert s.t_from_fraction(0.5).dtype == F64


def test_vp_discrete_table_interpolation_clamp_and_inverse():
    s = VPDiscreteSchedule(AC)
    assert (s.t_min, s.t_max) == (0.0, 999.0)
    # integer steps read the table; fractional ones interpolate log(alpha_bar) linearly
    k = torch.tensor([0.0, 1.0, 500.0, 998.0, 999.0], dtype=F64)
    torch.testing.assert_close(s.alpha(k), AC[k.long()].sqrt())
    torch.testing.assert_close(s.sigma(k), (1 - AC[k.long()]).sqrt())
    w = 0.25
    frac = torch.tensor([500 + w, 998 + w], dtype=F64)
    expect = torch.exp((1 - w) * torch.log(AC[[500, 998]]) + w * torch.log(AC[[501, 999]]))
    torch.testing.assert_close(s.alpha(frac) ** 2, expect)
    torch.testing.assert_close(s.sigma(frac) ** 2, 1 - expect)
    # times outside [0, N-1] are clamped to the ends of the table
    torch.testing.assert_close(s.alpha(torch.tensor([-5.0, 1500.0], dtype=F64)), AC[[0, 999]].sqrt())
    # the inverse of logSNR lands on the table's steps, and between them by the same linear interpolation
    lam = torch.log(AC / (1 - AC))
    idx = torch.tensor([0, 1, 250, 998, 999])
    torch.testing.assert_close(s.t_from_logsnr(lam[idx]), idx.to(F64))
    torch.testing.assert_close(s.t_from_logsnr(s.logsnr(frac)), frac)
    # beyond the table the inverse clamps to its ends
    torch.testing.assert_close(s.t_from_logsnr(torch.tensor([50.0, -50.0], dtype=F64)),
                               torch.tensor([0.0, 999.0], dtype=F64))
    torch.testing.assert_close(s.t_from_fraction(torch.tensor([0.0, 0.5, 1.0], dtype=F64)),
                               torch.tensor([0.0, 499.5, 999.0], dtype=F64))
    assert s.config() == {"kind": "vp-discrete", "alphas_cumprod": AC.tolist()}


def test_vp_discrete_keeps_float32_and_reads_integer_times_as_float64():
    s = VPDiscreteSchedule(AC)
    t32 = torch.tensor([10.5, 700.0], dtype=torch.float32)
    assert s.alpha(t32).dtype == torch.float32 and s.t_from_logsnr(s.logsnr(t32)).dtype == torch.float32
    torch.testing.assert_close(s.alpha(t32), s.alpha(t32.to(F64)).float())
    ti = torch.tensor([10, 700])
    assert s.alpha(ti).dtype == F64
    torch.testing.assert_close(s.alpha(ti), AC[ti].sqrt())


def test_make_schedule_builds_each_kind_and_names_the_choices():
    s = make_schedule("edm", sigma_max=10.0)
    assert isinstance(s, EDMSchedule) and s.t_max == 10.0
    assert isinstance(make_schedule("flow"), FlowSchedule)
    assert isinstance(schedule_from_config({"kind": "vp-cosine", "t_min": 0.1, "t_max": 0.5}), VPCosineSchedule)
    with pytest.raises(UsageError, match=r"unknown schedule 'cosine'; choose one of: edm, vp-cosine, flow, vp-discrete"):
        make_schedule("cosine")
    assert repr(FlowSchedule()) == "FlowSchedule({'kind': 'flow', 't_min': 0.001, 't_max': 0.999})"


# -- time grids -----------------------------------------------------------------------------------------------

def test_polynomial_grid_is_karras_eq5_in_ve_sigma():
    s = EDMSchedule()
    for rho in (7.0, 2.0):
        g = make_grid(s, 6, "polynomial", rho=rho, t_min=0.01, t_max=50.0)
        i = torch.arange(6, dtype=F64)
        expect = (50.0 ** (1 / rho) + i / 5 * (0.01 ** (1 / rho) - 50.0 ** (1 / rho))) ** rho
        torch.testing.assert_close(g, torch.cat([expect, torch.zeros(1, dtype=F64)]))
    # rho defaults to 7
    torch.testing.assert_close(make_grid(s, 4), make_grid(s, 4, rho=7.0))
    # on a VP schedule the same spacing holds for sigma/alpha
    vp = VPCosineSchedule()
    g = make_grid(vp, 5, "karras", rho=3.0, append_zero=False)
    ve = torch.tan(math.pi * g / 2)
    hi, lo = math.tan(math.pi * 0.999 / 2), math.tan(math.pi * 1e-3 / 2)
    expect = (hi ** (1 / 3) + torch.arange(5, dtype=F64) / 4 * (lo ** (1 / 3) - hi ** (1 / 3))) ** 3
    torch.testing.assert_close(ve, expect)


def test_logsnr_and_uniform_grids():
    s = FlowSchedule()
    g = make_grid(s, 5, "logsnr-uniform", t_min=0.1, t_max=0.9, append_zero=False)
    lam = 2 * torch.log((1 - g) / g)
    torch.testing.assert_close(lam, torch.linspace(2 * math.log(0.1 / 0.9), 2 * math.log(0.9 / 0.1), 5, dtype=F64))
    u = make_grid(s, 5, "time-uniform", t_min=0.1, t_max=0.9)
    torch.testing.assert_close(u, torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1, 0.0], dtype=F64))
    one = make_grid(s, 1, "uniform", t_min=0.1, t_max=0.9)
    torch.testing.assert_close(one, torch.tensor([0.9, 0.0], dtype=F64))


def test_discrete_grid_and_its_zero_start():
    s = VPDiscreteSchedule(AC)
    # t_min = 0: points + 1 timestamps whose last, 0, is the clean sentinel
    torch.testing.assert_close(make_grid(s, 4, "discrete"), torch.tensor([999.0, 749.0, 500.0, 250.0, 0.0], dtype=F64))
    g = make_grid(s, 3, "discrete", rho=2.0, t_min=1, t_max=900)
    expect = torch.round((900 ** 0.5 + torch.tensor([0.0, 0.5, 1.0], dtype=F64) * (1 - 900 ** 0.5)) ** 2)
    torch.testing.assert_close(g, torch.cat([expect, torch.zeros(1, dtype=F64)]))
    root = 30 + torch.arange(4, dtype=F64) / 3 * (4 - 30)  # uniform in t^(1/2) from sqrt(900) to sqrt(16)
    torch.testing.assert_close(make_grid(s, 4, "discrete", rho=2.0, t_min=16, t_max=900),
                               torch.cat([torch.round(root**2), torch.zeros(1, dtype=F64)]))
    with pytest.raises(UsageError, match="repeats integer timesteps"):
        make_grid(s, 8, "discrete", t_min=1, t_max=4)
    with pytest.raises(UsageError, match="^grid 'discrete' is for integer-timestep \\(vp-discrete\\) schedules, not "
                                         "'edm'; use polynomial, logsnr or uniform$"):
        make_grid(EDMSchedule(), 4, "discrete")


@pytest.mark.parametrize("kwargs, message", [
    ({"points": 0}, "at least 1 point, got 0"),
    ({"points": 3, "t_min": 0.5, "t_max": 0.5}, "t_max > t_min >= 0, got t_max=0.5, t_min=0.5"),
    ({"points": 3, "t_min": -0.1}, "t_max > t_min >= 0"),
    ({"points": 3, "rho": 0.0}, "rho must be > 0, got 0.0"),
    ({"points": 3, "kind": "cosine"}, "unknown time grid 'cosine'; choose one of: polynomial, logsnr"),
])
def test_grid_errors_name_the_problem(kwargs, message):
    with pytest.raises(UsageError, match=message):
        make_grid(FlowSchedule(), **kwargs)


@pytest.mark.parametrize("times, message", [
    (None, r"needs times=\[...\]"), ([0.5], "at least 2 values"), ([0.5, 0.5], "decrease strictly"),
    ([0.5, -0.1], "must be >= 0"),
])
def test_explicit_grid_errors(times, message):
    with pytest.raises(UsageError, match=message):
        make_grid(FlowSchedule(), 3, "explicit", times=times)


def test_explicit_grid_is_used_as_given():
    g = make_grid(FlowSchedule(), 99, "explicit", times=[0.9, 0.4, 0.0])
    torch.testing.assert_close(g, torch.tensor([0.9, 0.4, 0.0], dtype=F64))


def test_nested_grids_refine_every_interval():
    s = EDMSchedule()
    coarse, fine = nested_grids(s, 4, 2, "polynomial", rho=5.0, t_min=0.02, t_max=40.0)
    torch.testing.assert_close(fine, make_grid(s, 10, "polynomial", rho=5.0, t_min=0.02, t_max=40.0,
                                               append_zero=False))
    torch.testing.assert_close(coarse, fine[::3])
    assert coarse.numel() == 4
    # explicit coarse grid: sub-steps uniform in sigma^(1/rho)
    coarse, fine = nested_grids(s, 0, 1, "explicit", rho=1.0, times=[8.0, 2.0, 1.0])
    torch.testing.assert_close(fine, torch.tensor([8.0, 5.0, 2.0, 1.5, 1.0], dtype=F64))
    coarse, fine = TimeGrid("explicit", times=[8.0, 1.0]).nested(s, 0, 1)  # rho 7 by default
    torch.testing.assert_close(fine[1], torch.tensor(((8 ** (1 / 7) + 1) / 2) ** 7, dtype=F64))
    coarse, fine = nested_grids(s, 2, 3, "uniform", t_min=1.0, t_max=9.0)  # the smallest: one coarse interval
    torch.testing.assert_close(fine, torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0], dtype=F64))
    torch.testing.assert_close(coarse, torch.tensor([9.0, 1.0], dtype=F64))
    with pytest.raises(UsageError, match="substeps must be >= 0, got -1"):
        nested_grids(s, 4, -1)
    with pytest.raises(UsageError, match="at least 2 coarse points, got 1"):
        nested_grids(s, 1, 2)


def test_time_grid_value_and_fraction_grid():
    s = FlowSchedule()
    tg = TimeGrid("time_uniform", t_min=0.2, t_max=0.6)
    assert tg.kind == "uniform"
    torch.testing.assert_close(tg(s, 3), torch.tensor([0.6, 0.4, 0.2, 0.0], dtype=F64))
    torch.testing.assert_close(tg(s, 3, append_zero=False), torch.tensor([0.6, 0.4, 0.2], dtype=F64))
    assert TimeGrid(times=[2, 1]).times == (2.0, 1.0)
    fg = fraction_grid(FlowSchedule(t_min=0.0, t_max=1.0), 4)
    torch.testing.assert_close(fg, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))
    with pytest.raises(UsageError, match="at least 1 step, got 0"):
        fraction_grid(s, 0)


def test_time_grid_nests_in_its_own_range_and_needs_a_count():
    s, tg = FlowSchedule(), TimeGrid("time_uniform", t_min=0.2, t_max=0.6)
    coarse, fine = tg.nested(s, 3, 1)  # uniform from 0.6 to 0.2 in steps of 0.1, not the schedule's range
    torch.testing.assert_close(fine, torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2], dtype=F64))
    torch.testing.assert_close(coarse, torch.tensor([0.6, 0.4, 0.2], dtype=F64))
    torch.testing.assert_close(TimeGrid("explicit", times=[2, 1])(s), torch.tensor([2.0, 1.0], dtype=F64))
    with pytest.raises(UsageError, match="at least 1 point, got 0"):  # no count: explicit grids only
        tg(s)


class Float32Times(FlowSchedule):
    """A plugin schedule that answers in float32."""

    def t_from_fraction(self, u):
        return super().t_from_fraction(u).float()

    def t_from_logsnr(self, lam):
        return super().t_from_logsnr(lam).float()


def test_fraction_grids_and_grids_are_float64_i_over_k():
    unit = FlowSchedule(t_min=0.0, t_max=1.0)
    fg = fraction_grid(unit, 3)  # i/k in float64: 2/3 exact to 1e-16, not 1e-8
    torch.testing.assert_close(fg, torch.tensor([1.0, 2 / 3, 1 / 3, 0.0], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(fraction_grid(unit, 1), torch.tensor([1.0, 0.0], dtype=F64))
    assert fraction_grid(Float32Times(), 4).dtype == F64
    for kind in ("polynomial", "logsnr"):
        assert make_grid(Float32Times(), 5, kind).dtype == F64


def test_vp_discrete_from_a_list_keeps_float64_precision():
    """config() stores alphas_cumprod as a list; the schedule rebuilt from it is the float64 one, exactly."""
    s = schedule_from_config(VPDiscreteSchedule(AC).config())
    assert s.alphas_cumprod.dtype == F64
    k = torch.tensor([3.0, 400.25, 999.0], dtype=F64)
    torch.testing.assert_close(s.sigma(k), VPDiscreteSchedule(AC).sigma(k), rtol=0, atol=0)


def test_vp_discrete_inverse_above_the_first_step_is_exactly_zero():
    """A logSNR between the table's first entry and +inf (less noise than timestep 0) maps to t = 0, never below."""
    s = VPDiscreteSchedule(AC)
    lam0 = float(torch.log(AC[0] / (1 - AC[0])))
    got = s.t_from_logsnr(torch.tensor([lam0 + 0.5, lam0 + 1.0, lam0 + 3.0], dtype=F64))
    assert torch.equal(got, torch.zeros(3, dtype=F64))


def test_vp_discrete_inverse_on_a_zero_terminal_snr_table():
    """A zero-terminal-SNR table (alpha_bar[-1] = 0, Lin et al. 2024) has log(alpha_bar) = -inf at its end: logSNRs
    above the first entry still map to exactly t = 0 (the search index must stay >= 1, or the interpolation reads the
    infinite last entry and returns NaN), and the inverse of the finite interior stays the identity."""
    ac = AC.clone()
    ac[-1] = 0.0
    s = VPDiscreteSchedule(ac)
    lam0 = float(torch.log(ac[0] / (1 - ac[0])))
    got = s.t_from_logsnr(torch.tensor([lam0 + 0.5, lam0 + 3.0, math.inf], dtype=F64))
    assert torch.equal(got, torch.zeros(3, dtype=F64))
    t = [0.0, 1.0, 17.25, 500.5, 997.75]
    log_ab = [(1 - (x % 1)) * math.log(ac[int(x)]) + (x % 1) * math.log(ac[int(x) + 1]) for x in t]
    lam_t = torch.tensor([la - math.log(-math.expm1(la)) for la in log_ab], dtype=F64)
    torch.testing.assert_close(s.t_from_logsnr(lam_t), torch.tensor(t, dtype=F64), atol=1e-9, rtol=0)
