"""DMD2's generator side against hand-written references: the K-step regression weight (EDM's lambda at each
generator time over lambda at the first), the regression loss scaled by it, the generator loss as
lambda_DM L_DM + lambda_reg L_reg + lambda_G L_G with the batch's condition reaching every term, and the GAN
features taken with that condition."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import plugins.dmd2 as dmd2
from core.schedules import EDMSchedule, VPCosineSchedule
from plugins.dmd2 import DMD2, DMD2Config


def _edm_lambda(sigma_ve: float, sigma_data: float) -> float:
    return (sigma_ve ** 2 + sigma_data ** 2) / (sigma_ve * sigma_data) ** 2  # Karras et al. 2022, Table 1


@pytest.mark.parametrize("schedule,times", [(EDMSchedule(), [80.0, 10.0, 1.5, 0.2]),
                                            (VPCosineSchedule(), [0.98, 0.7, 0.4, 0.1])])
def test_step_weight_is_edms_lambda_at_tau_k_over_tau_0(schedule, times):
    objective = DMD2(DMD2Config(steps=4))
    objective.times = times
    # the student's sigma_data comes first (the teacher's is only a fallback)
    ctx = SimpleNamespace(teacher=SimpleNamespace(schedule=schedule, sigma_data=0.9),
                          student=SimpleNamespace(sigma_data=0.3))
    ve = [float(schedule.sigma(torch.tensor(t, dtype=torch.float64)) / schedule.alpha(torch.tensor(t, dtype=torch.float64)))
          for t in times]
    for k in range(4):
        expect = _edm_lambda(ve[k], 0.3) / _edm_lambda(ve[0], 0.3)
        assert objective.step_weight(k, ctx) == pytest.approx(expect, rel=1e-12), k
    assert objective.step_weight(3, ctx) > 1  # the late, low-noise steps weigh more
    uniform = DMD2(DMD2Config(steps=4, step_weighting="uniform"))
    uniform.times = times
    assert [uniform.step_weight(k, ctx) for k in range(4)] == [1.0] * 4


@pytest.mark.parametrize("weight", [2.0, 0.25])
def test_regression_loss_is_scaled_by_the_steps_weight(monkeypatch, weight):
    objective = DMD2(DMD2Config())
    objective.times = [80.0, 1.0]
    x_in, target = torch.randn(6, 2), torch.randn(6, 2)
    monkeypatch.setattr(objective, "generator_input", lambda ctx: (x_in, torch.ones(6)))
    monkeypatch.setattr(dmd2, "get_registry", lambda: SimpleNamespace(
        get=lambda kind, name: SimpleNamespace(factory=lambda *a, **k: target)))
    ctx = SimpleNamespace(teacher=SimpleNamespace(schedule=EDMSchedule(), sigma_data=0.5),
                          student=SimpleNamespace(), cache={"dmd2.groups": [(1, slice(0, 6))]}, batch={"cond": None})
    x = torch.randn(6, 2)
    unit = (x - target).square().mean()
    monkeypatch.setattr(objective, "step_weight", lambda k, ctx: 1.0)
    torch.testing.assert_close(objective.regression_loss(ctx, x), unit)
    monkeypatch.setattr(objective, "step_weight", lambda k, ctx: weight)
    torch.testing.assert_close(objective.regression_loss(ctx, x), weight * unit)


def test_generator_loss_sums_the_weighted_terms_with_the_batchs_condition(monkeypatch):
    objective = DMD2(DMD2Config(dm_weight=0.7, gan_gen_weight=0.3, regression_weight=2.0))
    x, cond, seen = torch.randn(4, 2, requires_grad=True), torch.tensor([1, 0, 2, 1]), {}
    ctx = SimpleNamespace(batch={"cond": cond}, cache={}, teacher="T", critic="C")
    monkeypatch.setattr(objective, "generate", lambda ctx: x)
    monkeypatch.setattr(objective, "use_gan", lambda ctx: True)

    def dm(x_, cond_, teacher, critic):
        seen["dm"] = (cond_, teacher, critic)
        return torch.tensor(0.4)

    def discriminate(ctx_, xs, cond_):
        seen["gan"] = cond_
        return [torch.tensor([0.5, -1.0])]

    monkeypatch.setattr(objective, "distribution_matching_loss", dm)
    monkeypatch.setattr(objective, "regression_loss", lambda ctx_, x_: torch.tensor(0.25))
    monkeypatch.setattr(objective, "discriminate", discriminate)
    loss, metrics = objective.generator_loss(ctx)
    g = torch.nn.functional.softplus(-torch.tensor([0.5, -1.0])).mean()  # non-saturating: E softplus(-h)
    torch.testing.assert_close(loss, 0.7 * torch.tensor(0.4) + 2.0 * torch.tensor(0.25) + 0.3 * g)
    assert seen["dm"][0] is cond and seen["dm"][1:] == ("T", "C") and seen["gan"] is cond
    assert set(metrics) == {"dm", "regression", "gan"} and torch.equal(ctx.cache["dmd2.x"], x.detach())


def test_gan_features_are_taken_with_the_condition(monkeypatch):
    objective = DMD2(DMD2Config())
    objective.feature_module = "F"
    cond, calls = torch.tensor([3, 1]), []

    def features(critic, module, x_t, t, cond_=None):
        calls.append(cond_)
        return x_t.sum(1, keepdim=True)

    monkeypatch.setattr(dmd2.gan, "critic_features", features)
    ctx = SimpleNamespace(teacher=SimpleNamespace(schedule=EDMSchedule()), critic="C",
                          nets={"gan_head": lambda f: 2 * f})
    (logits,) = objective.discriminate(ctx, [torch.randn(2, 3)], cond)
    assert logits.shape == (2, 1) and calls[0] is cond


def test_gan_inputs_are_each_batch_noised_at_its_own_uniform_time(monkeypatch):
    """Diffusion-GAN inputs: x_t = alpha(t) x + sigma(t) eps with t = t_from_fraction(u), u ~ U(0, 1) in float64,
    drawn batch by batch (u, then eps), written out with the same random stream."""
    objective, sched = DMD2(DMD2Config()), VPCosineSchedule()
    objective.feature_module = "F"
    monkeypatch.setattr(dmd2.gan, "critic_features", lambda critic, module, x_t, t, cond=None: x_t)
    ctx = SimpleNamespace(teacher=SimpleNamespace(schedule=sched), critic="C", nets={"gan_head": lambda f: f})
    xs = [torch.randn(3, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)]
    torch.manual_seed(7)
    got = objective.discriminate(ctx, xs, None)
    torch.manual_seed(7)
    for x, logits in zip(xs, got):
        t = sched.t_from_fraction(torch.rand(x.shape[0], dtype=torch.float64))
        eps = torch.randn_like(x)
        torch.testing.assert_close(logits, sched.alpha(t)[:, None] * x + sched.sigma(t)[:, None] * eps)


def test_regression_warmup_trains_on_the_regression_loss_alone(monkeypatch):
    objective = DMD2(DMD2Config(regression_warmup=3, dm_weight=0.7, regression_weight=2.0))
    x = torch.randn(4, 2)
    monkeypatch.setattr(objective, "generate", lambda ctx: x)
    monkeypatch.setattr(objective, "use_gan", lambda ctx: False)
    monkeypatch.setattr(objective, "regression_loss", lambda ctx_, x_: (x_ - 1).square().mean())
    monkeypatch.setattr(objective, "distribution_matching_loss", lambda *a: torch.tensor(0.4))
    ctx = SimpleNamespace(batch={"cond": None}, cache={}, teacher="T", critic="C", iteration=2)
    loss, metrics = objective.generator_loss(ctx)
    torch.testing.assert_close(loss, (x - 1).square().mean())
    assert list(metrics) == ["regression"]
    ctx.iteration = 3  # warm-up over: lambda_DM L_DM + lambda_reg L_reg
    loss, metrics = objective.generator_loss(ctx)
    torch.testing.assert_close(loss, 0.7 * torch.tensor(0.4) + 2.0 * (x - 1).square().mean())
    assert list(metrics) == ["dm", "regression"]


@pytest.mark.parametrize("k", [0, 2])
def test_regression_target_is_the_teachers_ode_from_t_max_for_step_0_and_from_tau_k_after(monkeypatch, k):
    """Step 0's input sigma(tau_0) z is pure noise: its target is the ODE image of z from t_max. Step k > 0's
    input is a noisy sample at tau_k: its ODE starts there. Either way the solver gets z = x_in / sigma(tau_k)."""
    from core.timesteps import make_grid

    sched, t_k, seen = VPCosineSchedule(), 0.7, {}
    objective = DMD2(DMD2Config(steps=4, regression_steps=5))
    objective.times = [0.99, 0.8, t_k, 0.3] if k else [t_k, 0.5, 0.4, 0.3]
    x_in = torch.randn(3, 2, dtype=torch.float64)
    monkeypatch.setattr(objective, "generator_input", lambda ctx: (x_in, torch.full((3,), t_k, dtype=torch.float64)))
    monkeypatch.setattr(objective, "step_weight", lambda k, ctx: 1.0)

    def solver(teacher, noise, grid, cond, **kw):
        seen.update(noise=noise, grid=grid)
        return torch.zeros_like(noise)

    monkeypatch.setattr(dmd2, "get_registry", lambda: SimpleNamespace(
        get=lambda kind, name: SimpleNamespace(factory=solver)))
    ctx = SimpleNamespace(teacher=SimpleNamespace(schedule=sched), cache={"dmd2.groups": [(k, slice(0, 3))]}, batch={"cond": None})
    objective.regression_loss(ctx, torch.zeros(3, 2, dtype=torch.float64))
    expect = make_grid(sched, 5) if k == 0 else make_grid(sched, 5, t_max=t_k)
    assert torch.equal(seen["grid"], expect)
    assert torch.equal(seen["noise"], x_in / sched.sigma(torch.tensor(t_k, dtype=torch.float64)))
