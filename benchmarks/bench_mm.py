"""Moment matching cost per update (moment_matching.md sec. 9) and the ancestral sampler's overhead.

    .venv/bin/python -m pytest benchmarks/bench_mm.py --benchmark-only

Every case uses the same residual-MLP denoiser (2-D data, width 256, 4 blocks, batch 512) as teacher,
student and auxiliary, so the ratios between groups' rows are the method's relative costs:
- ``mm-update``: plain denoising step (baseline), Alg. 2 auxiliary step, Alg. 2 generator step,
  Alg. 3 step with forward-mode JVP and with the finite-difference fallback.
- ``sampler``: 4-step ancestral (Alg. 1) vs 4-step euler/DDIM on the same grid.
"""

from __future__ import annotations

import copy

import pytest
import torch

from core import ops
from core.networks import DenoiserNet, ResidualMLP
from core.protocols import Context
from core.schedules import make_schedule
from core.timesteps import fraction_grid
from plugins.moment_matching import MMConfig, MMParamConfig, MomentMatching, MomentMatchingParam
from plugins.samplers.ancestral import ancestral
from plugins.samplers.basic import euler

BATCH = 512


class _Teacher:
    def __init__(self, net):
        self.net, self.schedule, self.sigma_data, self.data_shape = net, net.schedule, net.sigma_data, (2,)

    @torch.no_grad()
    def denoise(self, x_t, t, cond=None, guidance=None):
        return self.net.denoise(x_t, t, cond)

    def trainable_copy(self):
        return copy.deepcopy(self.net).requires_grad_(True)


def _net():
    return DenoiserNet(ResidualMLP(2, 256, 4, 128), make_schedule("edm"), "edm", 0.5)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = _Teacher(_net().requires_grad_(False).eval())
    return {"teacher": teacher, "student": teacher.trainable_copy(), "critic": teacher.trainable_copy()}


def _ctx(nets):
    return Context(nets, {"x": torch.randn(BATCH, 2) * 0.7, "cond": None}, 0, BATCH, "cpu")


def _step(objective, phase, ctx):
    loss, _ = objective.loss(phase, ctx)
    loss.backward()


@pytest.mark.benchmark(group="mm-update")
def test_denoise_step_baseline(benchmark, nets):
    net, ctx = nets["student"], _ctx(nets)

    def step():
        x = ctx.batch["x"]
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(BATCH, dtype=torch.float64))
        x_t = ops.add_noise(x, torch.randn_like(x), 1.0, sigma)
        ops.weighted_loss(net.denoise(x_t, sigma.float()), x).backward()

    benchmark(step)


@pytest.mark.benchmark(group="mm-update")
@pytest.mark.parametrize("phase", ["auxiliary", "generator"])
def test_mm_alg2_step(benchmark, nets, phase):
    benchmark(_step, MomentMatching(MMConfig()), phase, _ctx(nets))


@pytest.mark.benchmark(group="mm-update")
@pytest.mark.parametrize("jvp", ["forward", "fd"])
@pytest.mark.parametrize("data_moment", [True, False], ids=["data-moment", "zero-moment"])
def test_mm_alg3_step(benchmark, nets, jvp, data_moment):
    objective = MomentMatchingParam(MMParamConfig(jvp=jvp, data_moment=data_moment))
    objective.build(nets)
    benchmark(_step, objective, "generator", _ctx(nets))


@pytest.mark.benchmark(group="sampler")
@pytest.mark.parametrize("name", ["ancestral", "euler"])
def test_sampler_4_steps(benchmark, nets, name):
    fn = {"ancestral": ancestral, "euler": euler}[name]
    student = nets["student"]
    times = fraction_grid(student.schedule, 4)
    noise = torch.randn(4096, 2)
    benchmark(fn, student, noise, times)
