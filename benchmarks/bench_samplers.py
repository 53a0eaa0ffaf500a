"""Sampling latency per ODE sampler at a fixed number of grid steps, on CPU.

    FEWSTEP_BENCH_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_samplers.py --benchmark-only

Model: the ring8 residual MLP (width 256 x 4 blocks, fresh weights; cost does not depend on them),
batch 1024, an 8-step polynomial grid ending at sigma 0.002 (no final denoise). ``extra_info["nfe"]``
holds each sampler's network calls on that grid (Heun 2 per step, AFS one fewer), so the rows show the
per-step overhead of the solvers on top of the calls. Group ``samplers-8-steps``, baseline: ``euler``.
"""

from __future__ import annotations

import math

import pytest
import torch

from core.networks import DenoiserNet, ResidualMLP
from core.registry import get_registry
from core.schedules import EDMSchedule
from core.timesteps import make_grid

SAMPLERS = [("euler", {}), ("euler-afs", {}), ("heun", {}), ("dpmpp-2m", {}), ("dpmpp-3m", {}),
            ("dpmpp-3m", {"afs": True}), ("ipndm", {})]


class Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.schedule, self.calls = net, net.schedule, 0

    def denoise(self, *args, **kwargs):
        self.calls += 1
        return self.net.denoise(*args, **kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Counting(DenoiserNet(ResidualMLP(2), EDMSchedule(), "edm", 0.5).eval())


@pytest.mark.parametrize("name,opts", SAMPLERS, ids=[n + ("-afs" if o else "") for n, o in SAMPLERS])
def test_sampler_latency(benchmark, machine, model, name, opts):
    fn = get_registry().get("sampler", name).factory
    grid = make_grid(model.schedule, 9, append_zero=False)
    noise = torch.randn(1024, 2)
    model.calls = 0
    fn(model, noise, grid, **opts)
    benchmark.group = "samplers-8-steps"
    benchmark.extra_info.update(machine=machine, sampler=name, nfe=model.calls, batch=1024, **opts)
    with torch.no_grad():
        benchmark(fn, model, noise, grid, **opts)
    assert math.isfinite(benchmark.stats.stats.median)
