"""DMD2's optional regression loss (DMD, Yin et al. 2024a, eq. 9) and the from-scratch defaults: the target is the
teacher's probability-flow ODE solution from the generator's own input, checked against a float64 Euler written
out here on the exact mixture teacher."""

from __future__ import annotations

import pytest
import torch

from core.protocols import Context
from core.timesteps import make_grid
from plugins.dmd2 import DMD2, DMD2Config
from plugins.gmm import GaussianMixtureTeacher, GMMConfig


def euler_float64(teacher, x, times):
    """DDIM / Euler on the VE (EDM) probability-flow ODE: x_s = x0 + (s / t)(x - x0), then x0 at the end."""
    x = x.double()
    for t, s in zip(times[:-1], times[1:]):
        x0 = teacher.denoise(x, torch.full((x.shape[0],), t, dtype=torch.float64)).double()
        x = x0 if s == 0 else x0 + (s / t) * (x - x0)
    return x


def edm_lambda(sigma: float, sigma_data: float) -> float:
    """EDM's weight 1 / c_out^2 = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


@pytest.mark.parametrize("weighting", ["uniform", "edm"])
@pytest.mark.parametrize("steps", [1, 3])
def test_regression_gradient_pulls_x_to_the_teachers_ode_solution(steps, weighting):
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    obj = DMD2(DMD2Config(steps=steps, regression_solver="euler", regression_steps=6, step_weighting=weighting,
                          step_sampling="iteration"))
    obj.times = [80.0, 2.0, 0.3][:steps]
    obj.from_scratch = True
    for seed in range(20):  # the seed whose draw of k is the last step, the one the weighting changes most
        ctx = Context({"teacher": teacher, "student": teacher}, {"x": None, "cond": None}, 0, 512, "cpu")
        torch.manual_seed(seed)
        x_in, t_in = obj.generator_input(ctx)
        if float(t_in[0]) == obj.times[-1]:
            break
    x = torch.randn(512, 2, dtype=torch.float32, requires_grad=True)
    loss = obj.regression_loss(ctx, x)
    loss.backward()
    times = make_grid(teacher.schedule, 6, t_max=float(t_in[0])).tolist()
    assert times[0] == pytest.approx(float(t_in[0])) and times[-1] == 0
    target = euler_float64(teacher, x_in, times)
    # step k's weight: 1, or lambda(tau_k) / lambda(tau_0) on the VE (EDM) schedule, where sigma = t
    weight = 1.0 if weighting == "uniform" else (edm_lambda(float(t_in[0]), teacher.sigma_data)
                                                 / edm_lambda(80.0, teacher.sigma_data))
    expected = weight * 2 * (x.detach().double() - target) / x.numel()
    assert torch.allclose(x.grad.double(), expected, atol=1e-6, rtol=1e-4)
    # the target is a sample of the mixture, not a blur of it: at 6 Euler steps from sigma 80 most of it is on a mode
    if steps == 1:
        d2 = ((target[:, None, :] - teacher.means[None]) ** 2).sum(-1).min(1).values
        assert (d2.sqrt() < 4 * 0.08).double().mean() > 0.7


def test_stratified_regression_gradient_pulls_each_group_to_its_own_ode_solution():
    """step_sampling=stratified: rows at tau_k are pulled to the teacher's ODE solution from tau_k (6 float64 Euler
    steps; from t_max for step 0), scaled by step k's EDM weight."""
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    obj = DMD2(DMD2Config(steps=3, regression_solver="euler", regression_steps=6, step_sampling="stratified"))
    obj.times, obj.from_scratch = [80.0, 2.0, 0.3], True
    ctx = Context({"teacher": teacher, "student": teacher}, {"x": None, "cond": None}, 0, 300, "cpu")
    torch.manual_seed(0)
    x_in, t_in = obj.generator_input(ctx)
    x = torch.randn(300, 2, dtype=torch.float32, requires_grad=True)
    obj.regression_loss(ctx, x).backward()
    for k, lo in enumerate((0, 100, 200)):
        rows = slice(lo, lo + 100)
        assert torch.all(t_in[rows] == obj.times[k])
        times = make_grid(teacher.schedule, 6, t_max=None if k == 0 else obj.times[k]).tolist()
        target = euler_float64(teacher, x_in[rows] * (times[0] / obj.times[k]), times)
        weight = edm_lambda(obj.times[k], teacher.sigma_data) / edm_lambda(80.0, teacher.sigma_data)
        expected = weight * 2 * (x.detach()[rows].double() - target) / x.numel()
        assert torch.allclose(x.grad[rows].double(), expected, atol=1e-6, rtol=1e-4), k


def test_defaults_turn_regression_on_and_raise_the_lr_from_scratch():
    analytic = GaussianMixtureTeacher(GMMConfig(preset="ring8"))

    class NetworkTeacher:  # what a checkpoint or diffusers teacher looks like to the objective: not analytic
        schedule, data_shape = analytic.schedule, analytic.data_shape

    class PipelineTeacher(NetworkTeacher):  # a diffusers pipeline: each call is dear, DMD2's recipe (no regression)
        expensive_calls = True

    for teacher, weight, lr in ((analytic, 1.0, 1e-3), (NetworkTeacher(), 1.0, 1e-4), (PipelineTeacher(), 0.0, 1e-4)):
        obj = DMD2(DMD2Config(gan="off"))
        obj.build({"teacher": teacher, "student": analytic, "critic": analytic})
        assert (obj.regression_weight, obj.generator_lr) == (weight, lr)
        assert obj.phases()[0].lr == lr and obj.phases()[1].lr == lr
    obj = DMD2(DMD2Config(gan="off", regression_weight=0.5, lr=3e-4, critic_lr=2e-4))
    obj.build({"teacher": analytic, "student": analytic, "critic": analytic})
    assert (obj.regression_weight, obj.phases()[0].lr, obj.phases()[1].lr) == (0.5, 3e-4, 2e-4)
    # K steps: 3 from scratch (quality.md, thirteenth pass), unchanged for network and pipeline teachers
    for teacher, weight in ((analytic, 3.0), (NetworkTeacher(), 1.0), (PipelineTeacher(), 0.0)):
        obj = DMD2(DMD2Config(gan="off", steps=4))
        obj.build({"teacher": teacher, "student": analytic, "critic": analytic})
        assert obj.regression_weight == weight


def test_regression_warmup_updates_the_generator_on_the_ode_pairs_alone():
    """Before ``regression_warmup`` iterations the generator's loss is the regression loss alone (its gradient is
    2 (x - ODE(x_in)) / numel, the float64 Euler reference), so the critic is never asked; from then on DM joins."""
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    obj = DMD2(DMD2Config(gan="off", regression_solver="euler", regression_steps=6, regression_warmup=3))
    obj.build({"teacher": teacher, "student": teacher, "critic": teacher})

    class Generator(torch.nn.Module):  # G(x_in) = x_in + b: the gradient w.r.t. b is the loss's w.r.t. x, summed
        schedule = teacher.schedule

        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(torch.zeros(2))

        def denoise(self, x, t, cond=None):
            return x + self.b

    generator = Generator()
    ctx = Context({"teacher": teacher, "student": generator}, {"x": None, "cond": None}, 2, 256, "cpu")  # no critic
    loss, metrics = obj.generator_loss(ctx)
    loss.backward()
    x_in, _ = obj.generator_input(ctx)
    target = euler_float64(teacher, x_in, make_grid(teacher.schedule, 6).tolist())
    expected = (2 * (x_in.double() - target) / x_in.numel()).sum(0)
    assert set(metrics) == {"regression"}
    assert torch.allclose(generator.b.grad.double(), expected, atol=1e-6, rtol=1e-4)
    after = Context({"teacher": teacher, "student": generator, "critic": teacher}, {"x": None, "cond": None}, 3, 256,
                    "cpu")
    assert set(obj.generator_loss(after)[1]) == {"dm", "regression"}
