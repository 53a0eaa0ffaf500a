"""The PF-ODE view shared by the ODE samplers and the generation loops, against formulas written out here, with a
denoiser whose output is known (Gaussian data N(0, v): D(x; t) = alpha v x / (alpha^2 v + sigma^2))."""

from __future__ import annotations

import math

import pytest
import torch

from core.errors import UsageError
from core.generation import denoise_at, generate, multistep, one_call_per_step, start
from core.pfode import PFODE, afs_x0, integrate
from core.protocols import SamplingSpec
from core.schedules import EDMSchedule, VPCosineSchedule

F64 = torch.float64
V = 0.7  # data variance


class GaussianDenoiser:
    """The exact denoiser of N(0, V) data, recording each call's (time, guidance, kwargs)."""

    data_shape = (3,)

    def __init__(self, schedule):
        self.schedule, self.calls = schedule, []

    def denoise(self, x, t, cond=None, **kwargs):
        self.calls.append({"t": t, "cond": cond, **kwargs})
        a, s = self.schedule.alpha(t.double()).to(x.dtype), self.schedule.sigma(t.double()).to(x.dtype)
        a, s = a.view(-1, 1), s.view(-1, 1)
        return a * V * x / (a * a * V + s * s) + kwargs.get("guidance", 0.0)


def test_afs_x0_formula():
    y = torch.tensor([[1.0, -2.0]], dtype=F64)
    torch.testing.assert_close(afs_x0(y, 3.0), y * (1 - 3.0 / math.sqrt(10.0)))


def test_pfode_coefficients_on_a_vp_schedule():
    sched = VPCosineSchedule()
    model = GaussianDenoiser(sched)
    ode = PFODE(model, [0.9, 0.5, 0.0])
    assert ode.n == 2 and ode.times == [0.9, 0.5, 0.0]
    for i, t in enumerate((0.9, 0.5)):
        a, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
        assert ode.alpha[i] == pytest.approx(a, rel=1e-12)
        assert ode.s[i] == pytest.approx(s / a, rel=1e-12)
        assert ode.lam[i] == pytest.approx(-math.log(s / a), rel=1e-12)
    assert (ode.alpha[2], ode.s[2], ode.lam[2]) == (1.0, 0.0, math.inf)
    noise = torch.randn(4, 3, dtype=F64)
    y = ode.start(noise)
    torch.testing.assert_close(y, noise * ode.s[0])
    torch.testing.assert_close(ode.x(y, 0), y * ode.alpha[0])
    d = torch.randn(4, 3, dtype=F64)
    r = ode.s[1] / ode.s[0]
    torch.testing.assert_close(ode.euler(y, d, 0), r * y + (1 - r) * d)


@pytest.mark.parametrize("times", [[0.5], [0.5, 0.5], [0.2, 0.5], [0.9, 0.3, 0.5]])
def test_pfode_rejects_grids_that_do_not_decrease(times):
    with pytest.raises(UsageError, match="strictly decreasing grid of >= 2 values"):
        PFODE(GaussianDenoiser(EDMSchedule()), times)


def test_denoised_calls_the_model_at_x_and_counts():
    sched = EDMSchedule()
    model = GaussianDenoiser(sched)
    ode = PFODE(model, [2.0, 1.0], cond="c", guidance=0.25, model_kwargs={"nfe": 4})
    y = torch.randn(5, 3, dtype=F64)
    d = ode.denoised(y, 1)
    torch.testing.assert_close(d, V * y / (V + 1.0) + 0.25)
    call = model.calls[-1]
    assert call["cond"] == "c" and call["guidance"] == 0.25 and call["nfe"] == 4 and ode.nfe == 1
    torch.testing.assert_close(call["t"], torch.full((5,), 1.0, dtype=F64))
    ode = PFODE(model, [2.0, 1.0])
    ode.denoised(y, 0)
    assert "guidance" not in model.calls[-1] and ode.nfe == 1
    afs = PFODE(model, [2.0, 1.0], afs=True)
    n = len(model.calls)
    torch.testing.assert_close(afs.denoised(y, 0), afs_x0(y, 2.0))
    assert afs.nfe == 0 and len(model.calls) == n
    afs.denoised(y, 1)
    assert afs.nfe == 1


def test_integrate_runs_the_step_and_reports_in_x_space():
    sched = VPCosineSchedule()
    model = GaussianDenoiser(sched)
    ode = PFODE(model, [0.9, 0.6, 0.3])
    noise = torch.randn(2, 3, dtype=F64)
    seen = []
    out, traj = integrate(ode, noise, lambda y, i: (2 * y + i, y), True, seen.append)
    y0 = noise * ode.s[0]
    y1 = 2 * y0
    y2 = 2 * y1 + 1
    torch.testing.assert_close(traj[0], y0 * ode.alpha[0])
    torch.testing.assert_close(traj[1], y1 * ode.alpha[1])
    torch.testing.assert_close(out, y2 * ode.alpha[2])
    assert len(traj) == 3 and [c["i"] for c in seen] == [0, 1] and [c["t"] for c in seen] == [0.9, 0.6]
    torch.testing.assert_close(seen[1]["denoised"], y1)
    torch.testing.assert_close(seen[1]["x"], traj[2])
    torch.testing.assert_close(integrate(ode, noise, lambda y, i: (2 * y + i, y), False, None), out)


def test_generation_helpers():
    sched = EDMSchedule()
    model = GaussianDenoiser(sched)
    x = torch.randn(4, 3)
    denoise_at(model, x, 2.0, None, None)
    assert "guidance" not in model.calls[-1] and model.calls[-1]["t"].dtype == torch.float32
    torch.testing.assert_close(denoise_at(model, x, 2.0, "labels", 1.5), V * x / (V + 4) + 1.5)
    assert model.calls[-1]["guidance"] == 1.5 and model.calls[-1]["cond"] == "labels"
    denoise_at(model, x, 2.0, "labels", None)
    assert model.calls[-1]["cond"] == "labels"
    noise = torch.randn(4, 3)
    torch.testing.assert_close(start(model, noise, torch.tensor([3.0, 0.0], dtype=F64)), 3.0 * noise)
    assert start(model, noise.half(), [3.0]).dtype == torch.float16
    # python-float times are read in float64: the float64 start is exact
    vp, noise64 = GaussianDenoiser(VPCosineSchedule()), torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(start(vp, noise64, [0.9, 0.0]), math.sin(0.45 * math.pi) * noise64, rtol=1e-15, atol=0)


def test_one_call_per_step_and_multistep():
    sched = VPCosineSchedule()
    model = GaussianDenoiser(sched)
    noise = torch.randn(6, 3, dtype=F64)
    times = torch.tensor([0.9, 0.5, 0.0], dtype=F64)
    steps, seen = [], []

    def step(x, x0, t, s):
        steps.append((t, s))
        assert t.dtype == s.dtype == F64
        return x0 + s

    x, traj = one_call_per_step(model, noise, times, "labels", step, return_trajectory=True, guidance=0.0,
                                callback=seen.append)
    assert [(c["cond"], c["guidance"]) for c in model.calls] == [("labels", 0.0)] * 2
    x_start = noise * math.sin(math.pi * 0.9 / 2)
    a, s = math.cos(math.pi * 0.9 / 2), math.sin(math.pi * 0.9 / 2)
    x1 = a * V * x_start / (a * a * V + s * s) + 0.5
    a, s = math.cos(math.pi * 0.5 / 2), math.sin(math.pi * 0.5 / 2)
    x2 = a * V * x1 / (a * a * V + s * s)  # the step into 0 returns x0 itself
    torch.testing.assert_close(traj[0], x_start)
    torch.testing.assert_close(traj[1], x1)
    torch.testing.assert_close(x, x2)
    assert [(float(t), float(s)) for t, s in steps] == [(0.9, 0.5)] and [c["i"] for c in seen] == [0, 1]
    torch.testing.assert_close(seen[0]["denoised"], x1 - 0.5)
    torch.testing.assert_close(seen[0]["x"], traj[1])
    assert [c["t"] for c in seen] == [0.9, 0.5]
    torch.testing.assert_close(one_call_per_step(model, noise, times, None, step), x)  # no trajectory by default
    # multistep re-noises x0 to the next time with fresh noise from the generator
    g = torch.Generator().manual_seed(3)
    out = multistep(model, noise, torch.tensor([0.9, 0.5], dtype=F64), generator=g)
    eps = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    x0 = torch.cos(torch.tensor(0.9 * math.pi / 2, dtype=F64)) * V * x_start / (
        math.cos(math.pi * 0.9 / 2) ** 2 * V + math.sin(math.pi * 0.9 / 2) ** 2)
    torch.testing.assert_close(out, math.cos(math.pi / 4) * x0 + math.sin(math.pi / 4) * eps)


def test_generate_batches_conditions_and_overrides():
    sched = EDMSchedule()
    seen = []

    class Registry:
        def get(self, kind, name):
            assert (kind, name) == ("sampler", "mine")

            class Info:
                @staticmethod
                def factory(model, noise, times, cond, **options):
                    seen.append((noise.shape[0], cond, times, options))
                    return noise + 1

            return Info

    spec = SamplingSpec(sampler="mine", times=[2.0, 0.0], options={"a": 1, "b": 2})
    torch.manual_seed(0)
    out = generate(GaussianDenoiser(sched), spec, 5, cond=torch.arange(5), registry=Registry(), batch=2, b=3)
    torch.manual_seed(0)
    expect = torch.cat([torch.randn(2, 3), torch.randn(2, 3), torch.randn(1, 3)]) + 1
    torch.testing.assert_close(out, expect)
    assert [n for n, *_ in seen] == [2, 2, 1] and [c.tolist() for _, c, *_ in seen] == [[0, 1], [2, 3], [4]]
    assert seen[0][2].dtype == F64 and seen[0][3] == {"a": 1, "b": 3}
    out = generate(GaussianDenoiser(sched), spec, 2, registry=Registry(), shape=(1, 2))
    assert out.shape == (2, 1, 2) and seen[-1][1] is None


def test_pfode_on_a_discrete_schedule_reads_zero_as_clean_data():
    """On vp-discrete, timestep 0 still has noise (alpha_bar_0 < 1); the grid's 0.0 is the clean sentinel
    (alpha 1, VE sigma 0), while the timestep 1 is read from the table."""
    from core.schedules import VPDiscreteSchedule

    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)
    ode = PFODE(GaussianDenoiser(VPDiscreteSchedule(ac)), [999.0, 1.0, 0.0])
    assert ode.alpha[2] == 1.0 and ode.s[2] == 0.0 and ode.lam[2] == math.inf
    assert ode.alpha[1] == pytest.approx(math.sqrt(float(ac[1])), rel=1e-12)
    assert ode.s[1] == pytest.approx(math.sqrt((1 - float(ac[1])) / float(ac[1])), rel=1e-12)


def test_denoised_keeps_the_state_dtype():
    class Float64Model(GaussianDenoiser):
        def denoise(self, x, t, cond=None, **kwargs):
            return super().denoise(x.double(), t.double(), cond, **kwargs)

    ode = PFODE(Float64Model(EDMSchedule()), [2.0, 1.0])
    assert ode.denoised(torch.randn(3, 3), 0).dtype == torch.float32
