"""The example plugin's own tests: the fewstep conformance suite, plus what is specific to it."""

import math

import torch

from core.schedules import make_schedule
from core.testing import GaussianDenoiser
from core.timesteps import make_grid
from fewstep_example.churn import euler_churn


def test_registers_through_its_entry_point(fewstep_registry):
    assert fewstep_registry.get("objective", "example-cd").plugin == "example"
    assert fewstep_registry.get("sampler", "example-churn").dist == "fewstep-example-plugin"


def test_objective_conforms(fewstep_conformance):
    fewstep_conformance.check("objective", "example-cd")


def test_sampler_conforms(fewstep_conformance):
    fewstep_conformance.check("sampler", "example-churn")


def test_without_churn_it_is_a_second_order_ode_solver():
    """Gaussian data on EDM: the probability-flow ODE maps x_T = 80 z to m + std / sqrt(std^2 + 80^2) (x_T - m)
    exactly; with churn=0 the sampler's error against that map shrinks ~4x per doubling of steps (Heun)."""
    sched = make_schedule("edm")
    noise = torch.randn(1000, 2, dtype=torch.float64)
    exact = 0.3 + 0.5 / math.sqrt(0.25 + 80.0**2) * (80.0 * noise - 0.3)
    err = {n: float((euler_churn(GaussianDenoiser(sched), noise, make_grid(sched, n), churn=0.0) - exact).abs().max())
           for n in (16, 32)}
    assert err[32] < err[16] / 3
    assert err[32] < 0.05


def test_churn_is_random_per_seed_but_reproducible():
    sched = make_schedule("edm")
    times, noise = make_grid(sched, 12), torch.randn(256, 2)
    run = lambda seed: euler_churn(GaussianDenoiser(sched), noise, times, churn=20.0,  # noqa: E731
                                   generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert (run(0) - run(1)).abs().mean() > 1e-3


def test_churn_recovers_a_gaussian():
    """On exact N(0.3, 0.5^2) data, 64 churned steps give the right mean and std within 5%."""
    sched = make_schedule("edm")
    torch.manual_seed(0)
    x = euler_churn(GaussianDenoiser(sched), torch.randn(20000, 2), make_grid(sched, 64), churn=20.0).double()
    assert abs(float(x.mean()) - 0.3) < 0.02
    assert math.isclose(float(x.std()), 0.5, rel_tol=0.05)
