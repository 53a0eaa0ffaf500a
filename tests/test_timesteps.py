"""Time grids against their formulas (EDM eq. 5, logSNR/time-uniform spacing, SFD's nested teacher grid)."""

import json
import math

import attrs
import pytest
import torch

from core.errors import UsageError
from core.schedules import EDMSchedule, FlowSchedule, VPCosineSchedule, VPDiscreteSchedule
from core.timesteps import TimeGrid, make_grid, nested_grids, ve_sigma

BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
SD = VPDiscreteSchedule(torch.cumprod(1 - BETAS, 0))
CONTINUOUS = [EDMSchedule(), VPCosineSchedule(), FlowSchedule()]


def karras(s_max, s_min, n, rho=7.0):
    """EDM eq. 5, written out."""
    return [(s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(n)]


def test_polynomial_is_edm_eq5():
    grid = make_grid(EDMSchedule(), 18, append_zero=False)
    torch.testing.assert_close(grid, torch.tensor(karras(80.0, 0.002, 18), dtype=torch.float64), rtol=1e-12, atol=0)
    assert grid.dtype == torch.float64


def test_sfd_worked_example():
    """SFD's CIFAR-10 2-NFE grid: N = 4 on [0.006, 80] is [80, 10.93, 0.670, 0.006] (docs/methods/sfd.md sec. 3)."""
    grid = make_grid(EDMSchedule(), 4, t_min=0.006, t_max=80.0, append_zero=False)
    assert grid.tolist() == pytest.approx([80.0, 10.93, 0.670, 0.006], rel=5e-4)  # the note's 4 digits


@pytest.mark.parametrize("s", CONTINUOUS + [SD], ids=lambda s: s.name)
def test_polynomial_spacing_is_schedule_independent(s):
    """rho-spacing is defined on the VE sigma, so every schedule gets the same noise levels."""
    grid = make_grid(s, 9, append_zero=False)
    sig = ve_sigma(s, grid)
    want = karras(float(sig[0]), float(sig[-1]), 9)
    torch.testing.assert_close(sig, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert float(grid[0]) == s.t_max and float(grid[-1]) == s.t_min


@pytest.mark.parametrize("s", CONTINUOUS, ids=lambda s: s.name)
def test_logsnr_is_uniform_in_logsnr(s):
    grid = make_grid(s, 7, "logsnr", append_zero=False)
    lam = s.logsnr(grid)
    steps = lam[1:] - lam[:-1]
    torch.testing.assert_close(steps, steps.mean().expand(6), rtol=1e-6, atol=1e-9)
    if s.name == "edm":  # uniform logSNR = geometric sigmas
        torch.testing.assert_close(grid, torch.logspace(math.log10(80), math.log10(0.002), 7, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["uniform", "time-uniform", "time_uniform"])
def test_time_uniform_is_linspace(kind):
    s = VPCosineSchedule()
    torch.testing.assert_close(make_grid(s, 5, kind, append_zero=False),
                               torch.linspace(s.t_max, s.t_min, 5, dtype=torch.float64))


def test_discrete_integer_timesteps():
    grid = make_grid(SD, 10, "discrete", t_min=1, append_zero=False)
    assert grid.tolist() == [round(999 + i / 9 * (1 - 999)) for i in range(10)]
    quad = make_grid(SD, 10, "discrete", rho=2.0, t_min=1, append_zero=False)
    assert quad.tolist() == [round((999**0.5 + i / 9 * (1 - 999**0.5)) ** 2) for i in range(10)]
    assert bool((quad[:-1] > quad[1:]).all())


def test_discrete_to_zero_keeps_one_call_per_point():
    """On vp-discrete t_min = 0 is itself the clean sentinel, so ``points`` timestamps still cost ``points`` calls."""
    grid = make_grid(SD, 4, "discrete")
    assert grid.tolist() == [999.0, 749.0, 500.0, 250.0, 0.0]  # 4 steps, the last returns x0


def test_discrete_errors():
    with pytest.raises(UsageError, match="vp-discrete"):
        make_grid(EDMSchedule(), 4, "discrete")
    with pytest.raises(UsageError, match="repeats integer timesteps"):
        make_grid(SD, 20, "discrete", t_min=0, t_max=10, append_zero=False)


@pytest.mark.parametrize("s", CONTINUOUS, ids=lambda s: s.name)
def test_append_zero(s):
    grid = make_grid(s, 5)
    assert len(grid) == 6 and float(grid[-1]) == 0.0 and float(grid[-2]) == s.t_min
    assert make_grid(s, 1).tolist() == [s.t_max, 0.0]  # one call: denoise from the top


def test_explicit_used_as_given_and_validated():
    assert make_grid(EDMSchedule(), 0, "explicit", times=[80, 1.5, 0]).tolist() == [80.0, 1.5, 0.0]
    for bad in ([80, 80, 1], [1, 2], [5.0], [3, -1]):
        with pytest.raises(UsageError):
            make_grid(EDMSchedule(), 0, "explicit", times=bad)


def test_bad_input():
    with pytest.raises(UsageError, match="unknown time grid"):
        make_grid(EDMSchedule(), 4, "cosine")
    with pytest.raises(UsageError, match="at least 1 point"):
        make_grid(EDMSchedule(), 0)
    with pytest.raises(UsageError, match="t_max > t_min"):
        make_grid(EDMSchedule(), 4, t_min=5.0, t_max=1.0)


@pytest.mark.parametrize("kind", ["polynomial", "logsnr", "uniform"])
@pytest.mark.parametrize("s", CONTINUOUS, ids=lambda s: s.name)
def test_nested_grids_share_the_coarse_points(s, kind):
    """SFD's teacher grid: N_tea = (M+1)(N-1)+1 points, every (M+1)-th one a student point."""
    n, m = 4, 3
    coarse, fine = nested_grids(s, n, m, kind)
    assert len(fine) == (m + 1) * (n - 1) + 1 and len(coarse) == n
    assert torch.equal(fine[:: m + 1], coarse)
    torch.testing.assert_close(coarse, make_grid(s, n, kind, append_zero=False), rtol=1e-9, atol=1e-12)
    assert bool((fine[:-1] > fine[1:]).all())


def test_nested_explicit_refines_in_rho_space():
    s = EDMSchedule()
    coarse, fine = nested_grids(s, 0, 1, "explicit", rho=1.0, times=[80.0, 10.0, 2.0])
    assert fine.tolist() == pytest.approx([80.0, 45.0, 10.0, 6.0, 2.0])
    assert torch.equal(fine[::2], coarse)


def test_timegrid_object():
    s = VPCosineSchedule()
    g = TimeGrid("time-uniform", t_min=0.1)
    assert g.kind == "uniform"
    assert torch.equal(g(s, 5), make_grid(s, 5, "uniform", t_min=0.1))
    c, f = g.nested(s, 3, 1)
    assert torch.equal(f[::2], c)
    assert TimeGrid(**json.loads(json.dumps(attrs.asdict(g)))) == g
    with pytest.raises(UsageError):
        TimeGrid("nope")
