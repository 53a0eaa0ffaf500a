"""Moment matching (Salimans et al. 2024): Algorithm 2 (``mm``) and Algorithm 3 (``mm-param``).

References: the generator gradient w(s) (dx~/deta)^T (aux - teacher) written out by hand (float64),
Algorithm 3's surrogate nu^T grad_theta l_B differentiated by double backward (no JVP), the paper's time
sampling, and exact mixture samples for quality.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from core.errors import UsageError
from core.networks import DenoiserNet, ResidualMLP
from core.protocols import Context
from core.schedules import make_schedule
from core.timesteps import fraction_grid
from plugins.gmm import GaussianMixtureTeacher, GMMConfig
from plugins.moment_matching import (MMConfig, MMParamConfig, MomentMatching, MomentMatchingParam, data_side,
                                     draw, sample_times)
from tests.conftest import run_config, train


def small_net(schedule, sigma_data=0.5, seed=0):
    torch.manual_seed(seed)
    return DenoiserNet(ResidualMLP(2, 16, 2, 8), schedule, "edm", sigma_data).double()


def edm_weight(sigma, sd):
    return (sigma**2 + sd**2) / (sigma * sd) ** 2


def batch(n=12):
    return {"x": GaussianMixtureTeacher(GMMConfig()).sample_exact(n).double(), "cond": None}


class NetTeacher:
    """A network teacher in float64 (what teacher=checkpoint provides), for Algorithm 3."""

    def __init__(self, net):
        self.net, self.schedule, self.sigma_data, self.data_shape = net, net.schedule, net.sigma_data, (2,)

    def denoise(self, x_t, t, cond=None, guidance=None):
        return self.net.denoise(x_t, t, cond)

    def trainable_copy(self):
        return copy.deepcopy(self.net)


# ---------------------------------------------------------------------------------------------------
# time sampling

@pytest.mark.parametrize("mode", ["continuous", "grid"])
def test_times_are_at_most_one_student_step_apart(mode):
    sched = make_schedule("vp-cosine")
    k = 4
    s, t = sample_times(sched, 50_000, k, mode)
    span = sched.t_max - sched.t_min
    u_s, u_t = (s - sched.t_min) / span, (t - sched.t_min) / span
    assert bool((u_t >= u_s).all()) and bool((u_t - u_s <= 1 / k + 1e-12).all()) and bool((u_t <= 1 + 1e-12).all())
    if mode == "continuous":  # s ~ U(0, 1): mean 1/2, variance 1/12
        assert abs(float(u_s.mean()) - 0.5) < 0.01 and abs(float(u_s.var()) - 1 / 12) < 0.005
        assert float((u_t == 1).double().mean()) == pytest.approx(1 / (2 * k), abs=0.01)  # P(s + d > 1) = E[d]
    else:
        assert set((u_t * k).round().unique().tolist()) == {1.0, 2.0, 3.0, 4.0}



@pytest.mark.parametrize("mode", ["continuous", "grid"])
def test_times_are_drawn_on_the_requested_device(mode):
    # the meta device stands in for a GPU: a draw made on the default device would come back on the CPU
    s, t = sample_times(make_schedule("vp-cosine"), 8, 4, mode, device="meta")
    assert (s.device.type, t.device.type, s.dtype, t.dtype) == ("meta", "meta", torch.float64, torch.float64)

# ---------------------------------------------------------------------------------------------------
# Algorithm 2: the generator gradient

@pytest.mark.parametrize("weighting,times", [("edm", "continuous"), ("flat", "grid")])
def test_mm_generator_gradient_is_weighted_moment_gap_pulled_back(weighting, times):
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    sd = teacher.sigma_data
    # nets declaring another sigma_data: the EDM weight takes the teacher's (the data's)
    student, aux = small_net(teacher.schedule, 0.5, 1), small_net(teacher.schedule, 0.5, 2)
    obj = MomentMatching(MMConfig(weighting=weighting, time_sampling=times))
    b = batch()
    ctx = Context({"teacher": teacher, "student": student, "critic": aux}, b, 1, 12, "cpu")
    params = list(student.parameters())
    torch.manual_seed(7)
    loss, _ = obj.loss("generator", ctx)
    got = torch.autograd.grad(loss, params)

    torch.manual_seed(7)  # the same draws, then the gradient written out by hand
    d = draw(student, b["x"], None, 4, mode=times, refine=True)  # MM's default grid
    assert not d.z_s.requires_grad  # posterior sample of sg(x~)
    with torch.no_grad():
        gap = aux.denoise(d.z_s, d.s) - teacher.denoise(d.z_s, d.s)  # EDM: t = sigma
    w = edm_weight(d.s, sd) if weighting == "edm" else torch.ones_like(d.s)
    upstream = w[:, None] * gap / gap.numel()  # mean over batch and elements
    want = torch.autograd.grad(d.x_tilde, params, grad_outputs=upstream)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)
    assert sum(float(r.abs().sum()) for r in want) > 0


def test_mm_auxiliary_loss_is_fit_plus_teacher_regulariser():
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    sd = teacher.sigma_data
    student, aux = small_net(teacher.schedule, sd, 1), small_net(teacher.schedule, sd, 2)
    obj = MomentMatching(MMConfig(aux_teacher_weight=0.5, weighting="edm", time_sampling="continuous"))
    b = batch()
    ctx = Context({"teacher": teacher, "student": student, "critic": aux}, b, 0, 12, "cpu")
    torch.manual_seed(3)
    loss, _ = obj.loss("auxiliary", ctx)
    assert loss.requires_grad and not any(p.grad is not None for p in student.parameters())
    torch.manual_seed(3)
    with torch.no_grad():
        d = draw(student, b["x"], None, 4, refine=True)
        a, g = aux.denoise(d.z_s, d.s), teacher.denoise(d.z_s, d.s)
    w = edm_weight(d.s, sd)
    want = (w * ((a - d.x_tilde) ** 2).mean(1)).mean() + 0.5 * (w * ((a - g) ** 2).mean(1)).mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------------
# Algorithm 3: the parameter-space surrogate

@pytest.mark.parametrize("data_moment", [True, False], ids=["data-moment", "zero-moment"])
@pytest.mark.parametrize("precond,jvp", [("identity", "forward"), ("rms", "forward"), ("identity", "fd"),
                                         ("identity", "auto")])
def test_mm_param_surrogate_gradient_matches_double_backward(precond, jvp, data_moment):
    sched = make_schedule("edm")
    sd = 0.5
    net = small_net(sched, sd, 4)
    teacher, student = NetTeacher(net), small_net(sched, sd, 5)
    obj = MomentMatchingParam(MMParamConfig(precond=precond, jvp=jvp, fd_step=1e-5, data_moment=data_moment))
    obj.build({"teacher": teacher, "student": student})
    b = batch(16)
    ctx = Context({"teacher": teacher, "student": student}, b, 0, 16, "cpu")
    params, theta = list(student.parameters()), list(net.parameters())
    torch.manual_seed(11)
    loss, metrics = obj.loss("generator", ctx)
    got = torch.autograd.grad(loss, params)

    torch.manual_seed(11)
    x = b["x"]
    with torch.no_grad():
        a = draw(student, x[:8], None, 4, refine=True)
    d = draw(student, x[8:], None, 4, refine=True)

    def teacher_loss(dr, x0, z_s):  # l(theta) = mean_b w(s_b) mean_d (g_theta(z_s) - x0)^2
        return (edm_weight(dr.s, sd) * ((net.denoise(z_s, dr.s) - x0) ** 2).mean(1)).mean()

    def data_z_s(dr, x0):  # EDM posterior q(z_s | z_t, x0) written out, with the draw's own noise
        r = (dr.s**2 / dr.t**2)[:, None]
        return x0 + r * (dr.z_t - x0) + (dr.s * (dr.t**2 - dr.s**2).sqrt() / dr.t)[:, None] * dr.noise

    def moment(dr, x_tilde, x0, create_graph=False):  # grad_theta l on generated data, less its data-side value
        gen = teacher_loss(dr, x_tilde, dr.z_s)
        return torch.autograd.grad(gen - teacher_loss(dr, x0, data_z_s(dr, x0)) if data_moment else gen, theta,
                                   create_graph=create_graph)

    g_a = moment(a, a.x_tilde, x[:8])
    nu = [g / (g.abs() + 1e-8) if precond == "rms" else g for g in g_a]  # first Adam step: v_hat = g^2
    g_b = moment(d, d.x_tilde, x[8:], create_graph=True)
    surrogate = sum((n * g).sum() for n, g in zip(nu, g_b))  # nu^T (m_g - m_q)_B
    want = torch.autograd.grad(surrogate, params)
    tol = 1e-5 if jvp == "fd" else 1e-9
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * 1e-3)
    torch.testing.assert_close(metrics["moment_norm"], surrogate.detach(), rtol=tol, atol=0)


def test_data_side_draw_has_the_forward_marginal():
    """mm-param's data-side z_s ~ q(z_s | z_t, x), z_t ~ q(z_t | x), is a draw of q(z_s | x) = N(alpha_s x, sigma_s^2)
    (cosine schedule written out), whatever the generator predicted."""
    student, n = small_net(make_schedule("vp-cosine")), 200_000
    x = torch.tensor([[0.7, -1.3]], dtype=torch.float64).expand(n, 2)
    torch.manual_seed(3)
    with torch.no_grad():
        d = draw(student, x, None, 4)
    z_s = data_side(d, x, student.schedule)
    u = d.s[:, None]
    eps = (z_s - torch.cos(torch.pi * u / 2) * x) / torch.sin(torch.pi * u / 2)
    torch.testing.assert_close(eps.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(eps.var(0), torch.ones(2, dtype=torch.float64), atol=0.015, rtol=0)


def test_mm_param_needs_a_network_teacher():
    obj = MomentMatchingParam(MMParamConfig())
    with pytest.raises(UsageError, match=r"^objective=mm-param differentiates the teacher's parameters, and "
                                         r"GaussianMixtureTeacher has no network; use a network teacher "
                                         r"\(teacher=checkpoint teacher.path=RUN\) or objective=mm$"):
        obj.build({"teacher": GaussianMixtureTeacher(GMMConfig()), "student": small_net(make_schedule("edm"))})


def test_mm_draw_at_eta_zero_is_the_ddim_step():
    """eta = 0: z_s = alpha_s x~ + sigma_s (z_t - alpha_t x~) / sigma_t, no noise (cosine schedule written out)."""
    student, x = small_net(make_schedule("vp-cosine")), batch(64)["x"]
    d = draw(student, x, None, 4, eta=0.0)
    (a_t, s_t), (a_s, s_s) = ((torch.cos(torch.pi * u / 2)[:, None], torch.sin(torch.pi * u / 2)[:, None])
                              for u in (d.t, d.s))
    x_tilde = d.x_tilde.detach()
    torch.testing.assert_close(d.z_s, a_s * x_tilde + s_s * (d.z_t - a_t * x_tilde) / s_t)


class HintedTeacher:
    real_data_hint = "data=images data.path=FOLDER"


@pytest.mark.parametrize("teacher,hint", [(HintedTeacher(), "data=images data.path=FOLDER"),
                                          (object(), "data=NAME (e.g. data=gmm, or data=teacher-samples for a "
                                                     "checkpoint teacher)")], ids=["teachers-hint", "default"])
def test_mm_without_real_data_says_how_to_give_it(teacher, hint):
    sched = make_schedule("edm")
    ctx = Context({"teacher": teacher, "student": small_net(sched), "critic": small_net(sched)},
                  {"x": None, "cond": None}, 0, 4, "cpu")
    with pytest.raises(UsageError, match="^" + re.escape("moment matching forward-diffuses real data, but this run "
                                                         f"has none; set {hint}") + "$"):
        MomentMatching(MMConfig()).loss("generator", ctx)


def test_mm_param_splits_any_batch_of_two_or_more():
    sched = make_schedule("edm")
    teacher, student = NetTeacher(small_net(sched, seed=4)), small_net(sched, seed=5)
    obj = MomentMatchingParam(MMParamConfig())
    obj.build({"teacher": teacher, "student": student})
    nets = {"teacher": teacher, "student": student}
    loss, _ = obj.loss("generator", Context(nets, batch(2), 0, 2, "cpu"))  # halves of one sample each
    assert loss.requires_grad
    with pytest.raises(UsageError, match="^objective=mm-param splits each batch into two independent halves; use "
                                         "train.batch >= 2$"):
        obj.loss("generator", Context(nets, batch(1), 0, 1, "cpu"))


@pytest.mark.parametrize("teacher_fit", [None, 2])
def test_mm_fits_generator_and_auxiliary_to_an_exact_teacher_first(teacher_fit):
    """Alg. 2 starts from copies of the teacher; an exact (network-free) teacher has none, so both nets are first
    fitted to it (600 iterations by default, none for a network teacher), and then the MM losses take over."""
    teacher, sched = GaussianMixtureTeacher(GMMConfig(preset="ring8")), make_schedule("edm")
    student, aux = small_net(sched, seed=1), small_net(sched, seed=2)
    nets = {"teacher": teacher, "student": student, "critic": aux}
    obj = MomentMatching(MMConfig(teacher_fit=teacher_fit))
    obj.build(nets)
    fitting = 600 if teacher_fit is None else teacher_fit
    assert obj.fit_iterations == fitting and obj.lr == 1e-3  # from scratch: the larger default step
    expected = {"auxiliary": {"fit", "reg"}, "generator": {"moment_gap"}}
    for iteration in (fitting - 1, fitting + 1):
        for phase, net, other in (("auxiliary", aux, student), ("generator", student, aux)):
            loss, metrics = obj.loss(phase, Context(nets, batch(), iteration, 12, "cpu"))
            assert set(metrics) == ({"teacher_fit"} if iteration < fitting else expected[phase])
            if iteration < fitting:  # each phase fits its own net
                grads = torch.autograd.grad(loss, [*net.parameters(), *other.parameters()], allow_unused=True)
                n = len(list(net.parameters()))
                assert all(g is not None for g in grads[:n]) and all(g is None for g in grads[n:])
    network = MomentMatching(MMConfig())
    network.build({**nets, "teacher": NetTeacher(small_net(sched, seed=3))})
    assert network.fit_iterations == 0 and network.lr == 1e-4


def test_configs_resolve_with_paper_defaults():
    cfg = run_config("objective=mm", "teacher=gmm")
    assert cfg.critic.name == "fake-score"
    assert (cfg.train.lr_decay, cfg.train.warmup > 0) == ("linear", True)
    # measured departures from the paper's edm/continuous (docs/methods/quality.md, eighth pass)
    assert (cfg.objective.config.weighting, cfg.objective.config.time_sampling) == ("flat", "grid")
    # and the refined grid on EDM (twelfth pass), for both algorithms; `paper` is accepted, anything else is not
    assert cfg.objective.config.grid == run_config("objective=mm-param", "teacher=gmm").objective.config.grid == "refine"
    assert run_config("objective=mm", "teacher=gmm", "objective.grid=paper").objective.config.grid == "paper"
    phases = {p.name: p for p in MomentMatching(cfg.objective.config).phases()}
    assert phases["auxiliary"].betas == (0.0, 0.99) and phases["generator"].eps == 1e-12
    assert phases["generator"].grad_clip == 1.0
    assert (phases["auxiliary"].every, phases["auxiliary"].offset, phases["generator"].offset) == (2, 0, 1)
    with pytest.raises(UsageError, match="weighting"):
        run_config("objective=mm", "objective.weighting=snr2")
    with pytest.raises(UsageError, match="uses no critic"):
        run_config("objective=mm-param", "critic=fake-score")


@pytest.mark.parametrize("aux_lr,aux_steps", [(None, 1), (3e-4, 2)])
def test_phases_alternate_auxiliary_and_generator(aux_lr, aux_steps):
    adam = {"betas": (0.0, 0.99), "eps": 1e-12, "grad_clip": 1.0}
    aux, gen = MomentMatching(MMConfig(lr=2e-4, aux_lr=aux_lr, aux_steps=aux_steps)).phases()
    assert (aux.name, aux.trains, aux.every, aux.offset, aux.repeats) == ("auxiliary", ("critic",), 2, 0, aux_steps)
    assert aux.lr == pytest.approx(aux_lr or 1e-3)  # 5 x lr by default
    assert (gen.name, gen.trains, gen.every, gen.offset, gen.repeats, gen.lr) == ("generator", ("student",), 2, 1, 1,
                                                                                  2e-4)
    (param_gen,) = MomentMatchingParam(MMParamConfig(lr=3e-5)).phases()  # Algorithm 3: no auxiliary network
    assert (param_gen.name, param_gen.trains, param_gen.every, param_gen.lr) == ("generator", ("student",), 1, 3e-5)
    for phase in (aux, gen, param_gen):
        assert {k: getattr(phase, k) for k in adam} == adam


@pytest.mark.parametrize("objective", [MomentMatching(MMConfig(steps=3, sample_eta=0.5)),
                                       MomentMatchingParam(MMParamConfig(steps=3, sample_eta=0.5))],
                         ids=["mm", "mm-param"])
def test_sampling_spec_is_ancestral_on_the_i_over_k_grid(objective):
    sched = make_schedule("flow", t_min=0.1, t_max=0.9)
    spec = objective.sampling(small_net(sched))  # t = t_min + (i / k)(t_max - t_min), i = k..1, then clean 0
    assert (spec.sampler, spec.options) == ("ancestral", {"eta": 0.5})
    assert spec.times == pytest.approx([0.9, 0.1 + 0.8 * 2 / 3, 0.1 + 0.8 / 3, 0.0], rel=1e-15)
    spec8 = objective.with_steps(type(spec)("ancestral", spec.times, {"eta": 0.2}), 8, small_net(sched))
    assert spec8.times == pytest.approx([0.1 + 0.8 * i / 8 for i in range(8, 0, -1)] + [0.0], rel=1e-15)
    assert spec8.options == {"eta": 0.2}  # the spec's own eta is kept
    assert objective.with_steps(type(spec)("ancestral", spec.times, {}), 2, small_net(sched)).options == {"eta": 0.5}


@pytest.mark.parametrize("mode", ["continuous", "grid"])
def test_refined_grid_on_edm_keeps_each_step_in_its_own_interval(mode):
    """grid=refine (MM's default): on EDM the sampler's grid is sigma = 80, 2.5, 0.74, 0.17 (fractions 1, 1/2, 3/8,
    1/4 through the rho-spacing), and training draws (s, t) inside the warped intervals, on its points in grid mode."""
    sched, k = make_schedule("edm"), 4
    spec = MomentMatching(MMConfig()).sampling(small_net(sched))
    rho_map = lambda f: (0.002 ** (1 / 7) + f * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7  # noqa: E731
    assert spec.times == pytest.approx([80.0, rho_map(0.5), rho_map(0.375), rho_map(0.25), 0.0], rel=1e-12)
    assert MomentMatching(MMConfig(grid="paper")).sampling(small_net(sched)).times == pytest.approx(
        [80.0, rho_map(0.75), rho_map(0.5), rho_map(0.25), 0.0], rel=1e-12)
    s, t = sample_times(sched, 20_000, k, mode, refine=True)
    grid = torch.tensor(spec.times[:-1], dtype=torch.float64)
    assert bool((s <= t).all())
    inside = ((grid[None] > s[:, None] * (1 + 1e-12)) & (grid[None] < t[:, None] * (1 - 1e-12))).sum(1)
    if mode == "grid":  # t on a grid point, s inside the interval below it
        assert set(t.unique().tolist()) == {float(v) for v in grid}
        i = torch.searchsorted(-grid, -t)
        lower = torch.cat([grid[1:], grid.new_tensor([sched.t_min])])[i]
        assert bool((s >= lower * (1 - 1e-12)).all()) and int(inside.max()) == 0
    else:  # at most one step apart: no more than one grid point strictly between s and t
        assert int(inside.max()) == 1 and float((inside == 0).double().mean()) > 0.2


def test_step_fraction_warps_only_edm_and_only_three_or_more_steps():
    from core.timesteps import step_fraction

    edm, flow = make_schedule("edm"), make_schedule("flow")
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(step_fraction(flow, u, 4), u)
    torch.testing.assert_close(step_fraction(edm, u, 2), u)
    w = step_fraction(edm, u, 4)
    assert bool((w[1:] >= w[:-1]).all()) and float(w[0]) == 0.0 and float(w[-1]) == 1.0  # monotone, ends fixed
    knots = step_fraction(edm, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64), 4)
    torch.testing.assert_close(knots, torch.tensor([0.25, 0.375, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(step_fraction(edm, torch.tensor([0.625]), 4), torch.tensor([0.4375], dtype=torch.float64))
    # 8 steps: 1/8 .. 7/8 go evenly from 1/4 to 1/2
    eighths = step_fraction(edm, torch.arange(1, 8, dtype=torch.float64) / 8, 8)
    torch.testing.assert_close(eighths, 0.25 + 0.25 * torch.arange(7, dtype=torch.float64) / 6)


def test_mm_run_end_to_end_and_sample_cli(tmp_path):
    from core.sample import main

    out = tmp_path / "run"
    result = train("objective=mm", "teacher=gmm", "student.hidden=32", "student.depth=1", "train.steps=6",
                   "train.batch=32", "train.eval_every=0", "train.eval_samples=64", "train.preview_every=0",
                   f"out={out}")
    assert set(result["trainer"].optimizers) == {"auxiliary", "generator"}
    assert main([f"run={out}", "num=16", "steps=2", f"out={tmp_path / 's.npz'}"]) == 0


# ---------------------------------------------------------------------------------------------------
# quality on the ring (network teacher from objective=denoise; student and auxiliary copied from it)

def ancestral_energy(model, teacher, steps, n=3000, seed=0):
    """Energy distance of ``steps``-step ancestral samples to exact mixture samples, on MM's default (refined)
    grid, the one its students are trained and sampled on."""
    from core.metrics import energy_distance
    from plugins.samplers.ancestral import ancestral

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grid = fraction_grid(model.schedule, steps, refine=True)
        samples = ancestral(model, torch.randn(n, *teacher.data_shape), grid)
        return energy_distance(samples, teacher.sample_exact(n))


def distil(objective, teacher_run, tmp_path, steps, *extra):
    return train(f"objective={objective}", "teacher=checkpoint", f"teacher.path={teacher_run}", "student=copy",
                 f"train.steps={steps}", "train.batch=256", "train.eval_every=0", "train.preview_every=0",
                 "train.ckpt_every=100000", f"out={tmp_path / objective}", *extra)["trainer"]


@pytest.mark.slow
def test_mm_4_step_student_beats_the_teachers_4_step_sampler(ring8_teacher_run, tmp_path):
    # the defaults: the paper's 1:1 alternation, the auxiliary at 5x the generator's lr (docs/methods/quality.md)
    trainer = distil("mm", ring8_teacher_run, tmp_path, 400)
    teacher = trainer.teacher
    assert trainer.spec.times == pytest.approx(fraction_grid(teacher.schedule, 4, refine=True).tolist())
    t4, t64 = ancestral_energy(teacher, teacher, 4), ancestral_energy(teacher, teacher, 64)
    student = ancestral_energy(trainer.sampling_model(), teacher, 4)
    print(f"energy distance: teacher 4-step {t4:.4f}, teacher 64-step {t64:.4f}, mm student 4-step {student:.4f}")
    assert student < 0.5 * t4  # clearly beats the same-step ancestral baseline
    assert (t4 - student) / (t4 - t64) > 0.5  # and closes most of the gap to the 64-step sampler


@pytest.mark.slow
def test_mm_param_improves_on_its_initialisation(ring8_teacher_run, tmp_path):
    # the defaults: the moment matched to the data's (objective.data_moment), MM's refined grid
    trainer = distil("mm-param", ring8_teacher_run, tmp_path, 300)
    teacher = trainer.teacher
    assert trainer.spec.times == pytest.approx(fraction_grid(teacher.schedule, 4, refine=True).tolist())
    init = ancestral_energy(teacher, teacher, 4)  # student=copy starts as the teacher
    student = ancestral_energy(trainer.sampling_model(), teacher, 4)
    print(f"energy distance: initialisation (teacher 4-step) {init:.4f}, mm-param student 4-step {student:.4f}")
    assert student < 0.5 * init  # measured 0.0037 against 0.0209
