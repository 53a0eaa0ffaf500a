"""ODE samplers against known answers: closed-form Gaussian flows, the AFS and DPM-Solver++ formulas written
out, NFE accounting."""

import math

import pytest
import torch

from core.errors import UsageError
from core.registry import get_registry
from core.schedules import EDMSchedule, FlowSchedule, VPCosineSchedule
from core.timesteps import make_grid, ve_sigma
from plugins.gmm import GaussianMixtureTeacher, GMMConfig
from plugins.samplers.basic import euler
from plugins.samplers.ode import dpmpp_2m, dpmpp_3m, euler_afs, heun, ipndm

pytestmark = pytest.mark.usefixtures("one_thread")


SOLVERS = {"euler-afs": euler_afs, "heun": heun, "dpmpp-2m": dpmpp_2m, "dpmpp-3m": dpmpp_3m, "ipndm": ipndm}


class Gaussian:
    """Exact denoiser of x0 ~ N(0, c^2 I): E[x0 | x_t] = alpha c^2 x_t / (alpha^2 c^2 + sigma^2).

    Its PF-ODE in VE coordinates, dy/ds = y s / (c^2 + s^2), has the solution y(s) = y0 sqrt((c^2+s^2)/(c^2+s0^2)).
    Counts calls and records the times and keyword arguments it sees."""

    def __init__(self, schedule=None, c=0.5):
        self.schedule, self.c, self.calls, self.kwargs = schedule or EDMSchedule(), c, [], []

    def denoise(self, x, t, cond=None, **kwargs):
        self.calls.append(float(t[0]))
        self.kwargs.append(kwargs)
        a, s = (v.to(x.dtype)[:, None] for v in (self.schedule.alpha(t.double()), self.schedule.sigma(t.double())))
        return a * self.c**2 * x / (a * a * self.c**2 + s * s)

    def exact(self, y0, s0, s1):
        return y0 * math.sqrt((self.c**2 + s1**2) / (self.c**2 + s0**2))


def _grid(schedule, steps):
    return make_grid(schedule, steps + 1, append_zero=False)


# Convergence orders and the DPM-Solver++(3M)/iPNDM updates are tested against closed forms and written-out
# formulas in test_reference_samplers.py (no solver is checked against another of this package's solvers).


@pytest.mark.parametrize("name", list(SOLVERS))
def test_gaussian_flow_closed_form(name):
    """Every solver approaches the exact Gaussian flow, at its order: doubling 24 -> 48 steps divides the
    error by ~2 (Euler) or by >= 3.5 (the 2nd/3rd-order solvers)."""
    model = Gaussian()
    z = torch.randn(16, 3, dtype=torch.float64)
    errs = []
    for steps in (24, 48):
        grid = _grid(model.schedule, steps)
        out = SOLVERS[name](model, z, grid, afs=False)
        exact = model.exact(z * float(grid[0]), float(grid[0]), float(grid[-1]))
        errs.append(float((out - exact).abs().max() / exact.abs().max()))
    first = name == "euler-afs"
    assert errs[1] < (0.07 if first else 0.01), errs
    assert errs[0] / errs[1] > (1.8 if first else 3.5), errs


@pytest.mark.parametrize("name", list(SOLVERS))
def test_same_ode_on_every_schedule(name):
    """The VE view: on VP-cosine and flow schedules with the same VE sigmas, x / alpha follows the same path."""
    z = torch.randn(8, 2, dtype=torch.float64)
    outs = []
    for sched in (EDMSchedule(), VPCosineSchedule(), FlowSchedule()):
        lo, hi = (float(sched.t_from_logsnr(torch.tensor(-2 * math.log(v), dtype=torch.float64))) for v in (0.01, 20.0))
        grid = make_grid(sched, 9, t_min=lo, t_max=hi, append_zero=False)
        model = Gaussian(sched)
        x = SOLVERS[name](model, z, grid)  # starts at x = sigma z, i.e. at the same y = x / alpha = 20 z
        outs.append(x / float(sched.alpha(torch.tensor(lo, dtype=torch.float64))))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-8, atol=1e-10)


def test_first_order_step_is_ddim():
    """One DPM-Solver++ step (or an Euler-AFS step without AFS) is exactly the DDIM step of basic.euler."""
    model = Gaussian(VPCosineSchedule())
    z = torch.randn(8, 2, dtype=torch.float64)
    grid = torch.tensor([0.9, 0.3], dtype=torch.float64)
    want = euler(model, z, grid)
    for fn in (dpmpp_2m, dpmpp_3m, ipndm):
        torch.testing.assert_close(fn(model, z, grid), want)
    torch.testing.assert_close(euler_afs(model, z, grid, afs=False), want)


def test_dpmpp_2m_is_algorithm_2():
    """DPM-Solver++(2M), Lu et al. 2022b Alg. 2, written out in x space: x_{i+1} = (s_{i+1}/s_i) x_i
    - alpha_{i+1} (e^{-h} - 1) D~ with D~ = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}."""
    sched = VPCosineSchedule()
    model = Gaussian(sched, c=0.7)
    z = torch.randn(4, 2, dtype=torch.float64)
    grid = torch.tensor([0.95, 0.7, 0.4, 0.2], dtype=torch.float64)
    a, s = sched.alpha(grid), sched.sigma(grid)
    lam = torch.log(a / s)
    x = s[0] * z
    prev = None
    for i in range(3):
        d = model.denoise(x, grid[i].expand(4))
        h = lam[i + 1] - lam[i]
        if prev is None:
            dt = d
        else:
            r = (lam[i] - lam[i - 1]) / h
            dt = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * prev
        x = s[i + 1] / s[i] * x - a[i + 1] * torch.expm1(-h) * dt
        prev = d
    torch.testing.assert_close(dpmpp_2m(model, z, grid, lower_order_final=False), x)


def test_lower_order_final():
    """Under 15 steps the last step is a DDIM step from the previous state; at 15+ it is not."""
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    z = torch.randn(32, 2, dtype=torch.float64)
    for steps, expect_ddim in ((6, True), (15, False)):
        grid = _grid(teacher.schedule, steps)
        out, traj = dpmpp_3m(teacher, z, grid, return_trajectory=True)
        ddim = euler(teacher, traj[-2] / float(grid[-2]), grid[-2:])  # basic.euler starts at sigma_0 * noise
        assert torch.allclose(out, ddim, atol=1e-10) == expect_ddim


def test_afs_formula_and_nfe():
    """AFS: d_0 = y_0 / sqrt(1 + s_0^2), no call at t_0; every other step is an ordinary Euler step."""
    model = Gaussian()
    z = torch.randn(8, 2, dtype=torch.float64)
    grid = torch.tensor([80.0, 10.93, 0.67, 0.006], dtype=torch.float64)
    out, traj = euler_afs(model, z, grid, return_trajectory=True)
    y0 = 80.0 * z
    want1 = y0 + (10.93 - 80.0) * y0 / math.sqrt(1 + 80.0**2)
    torch.testing.assert_close(traj[1], want1)
    assert model.calls == pytest.approx([10.93, 0.67])  # NFE = steps - 1, never called at t_0
    torch.testing.assert_close(out, euler(model, traj[1] / 10.93, grid[1:]))


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("final_zero", [False, True])
def test_nfe_and_trajectory(name, afs, final_zero):
    model = Gaussian()
    steps = 5
    grid = make_grid(model.schedule, steps, append_zero=True) if final_zero else _grid(model.schedule, steps)
    z = torch.randn(4, 2)
    seen = []
    out, traj = SOLVERS[name](model, z, grid, return_trajectory=True, afs=afs, callback=lambda d: seen.append(d["nfe"]))
    per_step = 2 if name == "heun" else 1
    want = per_step * steps - (per_step - 1) * (1 if final_zero else 0) - (1 if afs else 0)
    assert len(model.calls) == want == seen[-1]
    assert len(traj) == len(grid) and traj[-1] is out and out.dtype == torch.float32
    torch.testing.assert_close(traj[0], z * float(grid[0]))
    if final_zero:  # the step into 0.0 returns the last denoised estimate
        assert not torch.equal(out, traj[-2])


def test_options_reach_the_model():
    model = Gaussian()
    dpmpp_3m(model, torch.randn(2, 2), _grid(model.schedule, 3), model_kwargs={"nfe": 3}, guidance=2.0)
    assert model.kwargs == [{"guidance": 2.0, "nfe": 3}] * 3


def test_bad_grid_is_a_usage_error():
    with pytest.raises(UsageError, match="strictly decreasing"):
        heun(Gaussian(), torch.randn(2, 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(UsageError, match="max_order"):
        ipndm(Gaussian(), torch.randn(2, 2), torch.tensor([2.0, 1.0]), max_order=5)


def test_registered_with_configs_and_sample_cli(tmp_path):
    from core.runconfig import resolve
    from core.sample import main

    reg = get_registry()
    for name in SOLVERS:
        assert reg.get("sampler", name).factory is SOLVERS[name]
    sampler = {"name": "dpmpp-3m", "afs": "true", "lower_order_final": "false"}
    cfg = resolve({"objective": "denoise", "sampler": sampler})
    assert cfg.sampler.config.afs and not cfg.sampler.config.lower_order_final
    out = tmp_path / "s.npz"
    assert main(["teacher=gmm", "sampler=dpmpp-3m", "steps=6", "num=50", f"out={out}"]) == 0
    assert out.exists()
    assert main(["teacher=gmm", "sampler=ipndm", "sampler.max_order=7", "num=5", f"out={out}"]) == 2


def test_exact_mixture_sampled_well_at_moderate_nfe():
    """End to end: dpmpp-3m at 10 steps from the exact ring8 teacher lands on the ring (VE sigma 0.002)."""
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    x = dpmpp_3m(teacher, torch.randn(500, 2, dtype=torch.float64), make_grid(teacher.schedule, 10))
    assert float((x.norm(dim=1) - 1).abs().median()) < 0.08
    assert float(ve_sigma(teacher.schedule, teacher.schedule.t_min)) == pytest.approx(0.002)
