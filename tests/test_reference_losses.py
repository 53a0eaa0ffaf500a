"""Objectives' denoising losses against hand-written float64 references.

- ``objective=denoise`` (Karras et al. 2022, sec. 5 and Table 1): log sigma_ve ~ N(P_mean, P_std^2),
  x_t = alpha x0 + sigma eps, L = mean_b lambda(sigma_ve) mean_i (D(x_t) - x0)^2 with
  lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, labels replaced by the null label -1 with probability p.
- DMD2's fake-score loss (method note sec. 5, EDM path): t uniform over the full range of the schedule,
  L_fake = mean_b lambda(sigma_ve) mean_i (D_F(x_t) - sg(x))^2 with lambda = 1/sigma_ve^2 + 1/sigma_d^2.

The networks here are fixed float64 functions that record what they are called with, so the reference
recomputes the loss from the recorded inputs with the formulas above, written out independently.
"""

from __future__ import annotations

import math

import pytest
import torch

from core.protocols import Context
from core.registry import get_registry
from core.schedules import make_schedule

# x_t = alpha x0 + sigma eps, written out per schedule (independent of core.schedules)
ALPHA_SIGMA = {"edm": lambda t: (torch.ones_like(t), t),
               "vp-cosine": lambda t: (torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)),
               "flow": lambda t: (1 - t, t)}


class RecordingNet:
    """A fixed random float64 denoiser D(x_t, t, c) = tanh(x_t W + log(t) b + E[c]) that records its calls.
    Row 4 of E is the null label -1."""

    def __init__(self, schedule, dim, seed, sigma_data=0.5, data_shape=None):
        g = torch.Generator().manual_seed(seed)
        self.schedule, self.sigma_data = schedule, sigma_data
        self.data_shape = data_shape or (dim,)
        self.W = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        self.E = torch.randn(5, dim, generator=g, dtype=torch.float64)
        self.calls = []

    def denoise(self, x_t, t, cond=None, guidance=None):
        c = torch.full((x_t.shape[0],), -1) if cond is None else cond
        out = torch.tanh(x_t.double() @ self.W + torch.log(t.double())[:, None] * self.b + self.E[c])
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.detach().clone(), "cond": None if cond is None
                           else cond.clone(), "out": out.detach().clone()})
        return out.to(x_t.dtype)


def _objective(name, **settings):
    info = get_registry().get("objective", name)
    return info.factory(info.config(**settings))


def _normal_ok(z, tol):
    """z looks like i.i.d. N(0, 1): mean, std and a tail fraction within tol of the exact values."""
    z = z.flatten()
    tail = float((z.abs() > 1.96).double().mean())  # exactly 0.05 for N(0, 1)
    return abs(float(z.mean())) < tol and abs(float(z.std()) - 1) < tol and abs(tail - 0.05) < tol / 2


# -- objective=denoise ---------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["edm", "vp-cosine"])
def test_denoise_loss_is_edm_weighted_l2_of_the_recorded_call(schedule):
    B, D, sd = 20000, 3, 0.7
    obj = _objective("denoise")
    c = obj.config
    net = RecordingNet(make_schedule(schedule), D, seed=1, sigma_data=sd)
    x0 = 0.8 * torch.randn(B, D, dtype=torch.float64)
    labels = torch.randint(0, 4, (B,))
    ctx = Context({"student": net}, {"x": x0, "cond": labels}, iteration=0, batch_size=B, device="cpu")
    loss, _ = obj.loss("denoiser", ctx)

    (call,) = net.calls
    t = call["t"].double()
    a, s = (v[:, None] for v in ALPHA_SIGMA[schedule](t))
    sigma_ve = (s / a).squeeze(1)
    # the sigma draw: log sigma_ve ~ N(P_mean, P_std^2) (no clamping at these settings)
    assert _normal_ok((sigma_ve.log() - c.p_mean) / c.p_std, 0.02)
    # the noise: x_t = alpha x0 + sigma eps with eps ~ N(0, I)
    assert _normal_ok((call["x_t"] - a * x0) / s, 0.02)
    # label dropout: a fraction p of the labels become -1, the rest are kept
    dropped = call["cond"] == -1
    assert abs(float(dropped.double().mean()) - c.label_dropout) < 0.01
    assert torch.equal(call["cond"][~dropped], labels[~dropped])
    # the loss: lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 times the per-sample MSE, batch mean
    lam = (sigma_ve**2 + sd**2) / (sigma_ve * sd) ** 2
    want = (lam * (call["out"] - x0).square().mean(1)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)


def test_denoise_draws_reproduce_from_the_seed():
    """Replaying torch's RNG from the same seed gives exactly the draws the objective made, in this order:
    the dropout coin per label, the log-normal sigma per sample (float64), the noise (like x0)."""
    B, D = 64, 2
    obj = _objective("denoise", p_mean=-0.4, p_std=0.9, label_dropout=0.3)
    net = RecordingNet(make_schedule("edm"), D, seed=2)
    x0 = torch.randn(B, D, dtype=torch.float64)
    labels = torch.randint(0, 4, (B,))
    ctx = Context({"student": net}, {"x": x0, "cond": labels}, iteration=0, batch_size=B, device="cpu")
    torch.manual_seed(123)
    obj.loss("denoiser", ctx)
    torch.manual_seed(123)
    drop = torch.rand(B) < 0.3
    sigma = torch.exp(-0.4 + 0.9 * torch.randn(B, dtype=torch.float64))
    eps = torch.randn(B, D, dtype=torch.float64)
    (call,) = net.calls
    assert torch.equal(call["cond"], torch.where(drop, -1, labels))
    torch.testing.assert_close(call["t"], sigma, rtol=1e-14, atol=0)  # EDM: t = sigma
    torch.testing.assert_close(call["x_t"], x0 + sigma[:, None] * eps, rtol=1e-14, atol=1e-14)


def test_denoise_without_labels_or_dropout():
    """No labels (at any dropout) or no dropout: the labels pass unchanged and no coin is drawn for them."""
    net = RecordingNet(make_schedule("edm"), 2, seed=3)
    x0 = torch.randn(32, 2, dtype=torch.float64)
    labels = torch.randint(0, 4, (32,))
    for dropout, cond in ((0.0, labels), (0.0, None), (0.1, None)):
        torch.manual_seed(5)
        _objective("denoise", label_dropout=dropout).loss("denoiser", Context({"student": net}, {"x": x0, "cond": cond},
                                                                              0, 32, "cpu"))
        torch.manual_seed(5)
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(32, dtype=torch.float64))  # the first draw is the sigma draw
        call = net.calls[-1]
        assert (call["cond"] is None) if cond is None else torch.equal(call["cond"], labels)
        torch.testing.assert_close(call["t"], sigma, rtol=1e-14, atol=0)


# -- DMD2's fake-score (critic) loss ---------------------------------------------------------------------

@pytest.fixture
def float64_default():
    """The generator's noise is drawn in the default dtype; float64 makes the whole phase float64."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.mark.parametrize("schedule", ["edm", "vp-cosine", "flow"])
def test_dmd2_fake_score_loss_and_weight(schedule, float64_default):
    """The critic phase with the GAN off is exactly L_fake on the generator's detached output."""
    B, D, sd = 20000, 3, 0.7
    sched = make_schedule(schedule)
    teacher = RecordingNet(sched, D, seed=10, sigma_data=1.3)
    student = RecordingNet(sched, D, seed=11)
    critic = RecordingNet(sched, D, seed=12, sigma_data=sd)  # the critic's own sigma_data is the one used
    obj = _objective("dmd2", gan="off")
    nets = {"teacher": teacher, "student": student, "critic": critic}
    assert obj.build(nets) == {}
    cond = torch.randint(0, 4, (B,))
    ctx = Context(nets, {"x": None, "cond": cond}, iteration=1, batch_size=B, device="cpu")
    loss, _ = obj.loss("critic", ctx)

    x = student.calls[-1]["out"]  # the generator's x0 estimate, x = G(z, tau_0)
    (call,) = critic.calls
    assert torch.equal(call["cond"], cond)  # the critic is conditioned, without guidance
    t = call["t"].double()
    # t covers the full training range (the DM loss uses 2%-98%; the fake score uses all of it)
    lo, hi = float(sched.t_from_fraction(0.01)), float(sched.t_from_fraction(0.99))
    assert float(t.min()) < lo and float(t.max()) > hi
    assert float(t.min()) >= sched.t_min - 1e-12 and float(t.max()) <= sched.t_max + 1e-12
    a, s = (v[:, None] for v in ALPHA_SIGMA[schedule](t))
    assert _normal_ok((call["x_t"] - a * x) / s, 0.02)
    sigma_ve = (s / a).squeeze(1)
    lam = 1 / sigma_ve**2 + 1 / sd**2
    want = (lam * (call["out"] - x).square().mean(1)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)


def test_denoise_has_one_phase_on_the_student_at_its_lr():
    """The phase name keys the optimizer state in checkpoints and the logged metrics (denoiser/loss)."""
    (phase,) = _objective("denoise", lr=3e-3).phases()
    assert (phase.name, phase.trains, phase.lr, phase.every, phase.repeats) == ("denoiser", ("student",), 3e-3, 1, 1)


@pytest.mark.parametrize("p_mean", [6.0, -9.0])
def test_denoise_clamps_sigma_to_the_schedule_and_weights_the_clamped_sigma(p_mean):
    """Draws beyond the schedule's range (EDM: 0.002..80) are clamped to it, and lambda uses the clamped sigma."""
    obj = _objective("denoise", p_mean=p_mean, p_std=0.5)
    sched = make_schedule("edm")
    net = RecordingNet(sched, 2, seed=4)
    x0 = torch.randn(256, 2, dtype=torch.float64)
    loss, _ = obj.loss("denoiser", Context({"student": net}, {"x": x0, "cond": None}, 0, 256, "cpu"))
    t = net.calls[0]["t"]
    assert float(t.min()) >= sched.t_min and float(t.max()) <= sched.t_max
    edge = sched.t_max if p_mean > 0 else sched.t_min
    assert float((t == edge).double().mean()) > 0.9  # almost every draw lies beyond that edge
    lam = (t**2 + 0.5**2) / (t * 0.5) ** 2
    torch.testing.assert_close(loss, (lam * (net.calls[0]["out"] - x0).square().mean(1)).mean(), rtol=1e-12, atol=0)


# -- DMD2's distribution-matching and regression losses ---------------------------------------------------------

class GuidedRecordingNet(RecordingNet):
    """A RecordingNet teacher that also records the guidance scale it is called with (and has a default one)."""

    guidance = 2.5

    def denoise(self, x_t, t, cond=None, guidance=None):
        out = super().denoise(x_t, t, cond)
        self.calls[-1]["guidance"] = guidance
        return out


# t = t_from_fraction(u) written out: Karras rho-spacing on EDM, linear in t on flow
FRACTION = {"edm": lambda u: (0.002 ** (1 / 7) + u * (80.0 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7,
            "flow": lambda u: 1e-3 + u * (1 - 2e-3)}


@pytest.mark.parametrize("schedule", ["edm", "flow"])
@pytest.mark.parametrize("guidance", [None, 4.0])
def test_dmd2_distribution_matching_loss_and_its_gradient(schedule, guidance, float64_default):
    """L_DM: t = t_from_fraction(lo + (hi - lo) u), x_t = alpha x + sigma eps, x0_real from the teacher with CFG (the
    objective's scale, else the teacher's), x0_fake from the critic without; loss 0.5 mean(g^2) and dL/dx = g / numel,
    g = (x0_fake - x0_real) / mean_i |x - x0_real| (method note sec. 4). Draws replayed from the seed."""
    B, D = 512, 3
    sched = make_schedule(schedule)
    teacher, critic = GuidedRecordingNet(sched, D, seed=20), RecordingNet(sched, D, seed=21)
    obj = _objective("dmd2", gan="off", dm_t_range=(0.1, 0.6), guidance=guidance)
    x = (0.9 * torch.randn(B, D)).requires_grad_()
    cond = torch.randint(0, 4, (B,))
    torch.manual_seed(7)
    loss = obj.distribution_matching_loss(x, cond, teacher, critic)
    torch.manual_seed(7)
    t = FRACTION[schedule](0.1 + 0.5 * torch.rand(B, dtype=torch.float64))
    eps = torch.randn(B, D)
    (real_call,), (fake_call,) = teacher.calls, critic.calls
    assert real_call["guidance"] == (2.5 if guidance is None else guidance)
    assert torch.equal(real_call["cond"], cond) and torch.equal(fake_call["cond"], cond)
    torch.testing.assert_close(real_call["t"], t, rtol=1e-12, atol=1e-12)
    a, s = (v[:, None] for v in ALPHA_SIGMA[schedule](t))
    torch.testing.assert_close(real_call["x_t"], a * x.detach() + s * eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fake_call["x_t"], real_call["x_t"], rtol=0, atol=0)
    real, fake = real_call["out"], fake_call["out"]
    g = (fake - real) / (x.detach() - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(loss, 0.5 * g.square().mean(), rtol=1e-10, atol=0)
    loss.backward()
    torch.testing.assert_close(x.grad, g / x.numel(), rtol=1e-10, atol=1e-15)


class GaussianTeacher:
    """The exact denoiser of N(0, V) data on the EDM schedule: D(x; sigma) = V x / (V + sigma^2)."""

    V, data_shape, sigma_data = 0.6, (2,), 0.5

    def __init__(self):
        self.schedule = make_schedule("edm")

    def denoise(self, x_t, t, cond=None, guidance=None):
        return self.V * x_t / (self.V + t.to(x_t.dtype)[:, None] ** 2)


def test_dmd2_regression_target_is_the_teachers_ode_solution(float64_default):
    """DMD's regression loss: MSE between G's output and where the teacher's PF-ODE takes the generator's input
    x_in at tau_0. For N(0, V) data the ODE's solution is x_in sqrt(V / (V + sigma_0^2)) (closed form; 256 steps of
    DPM-Solver++(2M) reach it to about 2e-4)."""
    B = 256
    teacher, student = GaussianTeacher(), RecordingNet(make_schedule("edm"), 2, seed=30)
    obj = _objective("dmd2", gan="off", regression_weight=2.0, regression_steps=256, dm_weight=0.5)
    nets = {"teacher": teacher, "student": student, "critic": RecordingNet(make_schedule("edm"), 2, seed=31)}
    obj.build(nets)
    ctx = Context(nets, {"x": None, "cond": None}, iteration=0, batch_size=B, device="cpu")
    x = torch.randn(B, 2)
    reg = obj.regression_loss(ctx, x)
    x_in, t_in = obj.generator_input(ctx)
    assert torch.equal(t_in, torch.full((B,), 80.0))  # one generator step: tau_0 = sigma_max
    target = x_in * math.sqrt(teacher.V / (teacher.V + 80.0**2))
    torch.testing.assert_close(reg, (x - target).square().mean(), rtol=2e-3, atol=0)
    # the generator phase: dm_weight L_DM + regression_weight L_reg on the same G(x_in)
    ctx = Context(nets, {"x": None, "cond": None}, iteration=1, batch_size=B, device="cpu")
    loss, metrics = obj.loss("generator", ctx)
    torch.testing.assert_close(loss, 0.5 * metrics["dm"] + 2.0 * metrics["regression"])
    G, x_in = student.calls[-1]["out"], ctx.cache["dmd2.input"][0]
    target = x_in * math.sqrt(teacher.V / (teacher.V + 80.0**2))
    torch.testing.assert_close(metrics["regression"], (G - target).square().mean(), rtol=2e-3, atol=0)
    torch.testing.assert_close(ctx.cache["dmd2.x"], G)


# -- moment matching: weighting, time sampling, the (z_t, x~, z_s) draw, the teacher fit ------------------------

def test_mm_loss_weights_closed_forms():
    """w(s) at the VE sigma = tan(pi s / 2) of the cosine schedule: EDM (sigma^2 + sd^2)/(sigma sd)^2, flat 1,
    snr = 1/sigma^2, snr+1 = 1/sigma^2 + 1."""
    from plugins.moment_matching import loss_weight

    sched, sd = make_schedule("vp-cosine"), 0.7
    s = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    sig = torch.tan(math.pi * s / 2)
    torch.testing.assert_close(loss_weight(sched, s, "edm", sd), (sig**2 + sd**2) / (sig * sd) ** 2)
    torch.testing.assert_close(loss_weight(sched, s, "flat", sd), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(loss_weight(sched, s, "snr", sd), 1 / sig**2)
    torch.testing.assert_close(loss_weight(sched, s, "snr+1", sd), 1 / sig**2 + 1)
    from core.errors import UsageError
    with pytest.raises(UsageError, match="unknown weighting 'sigma'; choose one of: edm, flat, snr, snr"):
        loss_weight(sched, s, "sigma", sd)


@pytest.mark.parametrize("mode", ["continuous", "grid"])
def test_mm_time_sampling_replayed_from_the_seed(mode):
    """continuous: s = u1, t = min(1, u1 + u2 / k); grid: t = i/k, i ~ U{1..k}, s = t - u / k (Salimans et al. 2024
    Alg. 2 and the Dual-Rate variant), mapped through the flow schedule's t_min + u (t_max - t_min)."""
    from plugins.moment_matching import sample_times

    sched, n, k = make_schedule("flow", t_min=0.1, t_max=0.9), 4096, 4
    torch.manual_seed(11)
    s, t = sample_times(sched, n, k, mode)
    torch.manual_seed(11)
    if mode == "grid":
        u_t = torch.randint(1, k + 1, (n,)).double() / k
        u_s = u_t - torch.rand(n, dtype=torch.float64) / k
    else:
        u_s = torch.rand(n, dtype=torch.float64)
        u_t = torch.minimum(u_s + torch.rand(n, dtype=torch.float64) / k, torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(s, 0.1 + 0.8 * u_s, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(t, 0.1 + 0.8 * u_t, rtol=1e-14, atol=1e-14)
    assert s.dtype == t.dtype == torch.float64


def test_mm_draw_is_forward_noise_student_then_gaussian_posterior():
    """z_t = alpha_t x + sigma_t eps; x~ = student(z_t, t); z_s ~ q(z_s | z_t, x = x~) at eta = 1: mean
    (alpha_ts sigma_s^2 z_t + alpha_s sigma_ts^2 x~) / sigma_t^2, std sigma_ts sigma_s / sigma_t (Kingma et al. 2021)."""
    from plugins.moment_matching import draw

    sched = make_schedule("vp-cosine")
    student = RecordingNet(sched, 3, seed=40)
    x = torch.randn(256, 3, dtype=torch.float64)
    cond = torch.randint(0, 4, (256,))
    torch.manual_seed(5)
    d = draw(student, x, cond, 4)
    torch.manual_seed(5)
    u_s = torch.rand(256, dtype=torch.float64)
    u_t = (u_s + torch.rand(256, dtype=torch.float64) / 4).clamp(max=1.0)
    s, t = 1e-3 + 0.998 * u_s, 1e-3 + 0.998 * u_t
    eps = torch.randn(256, 3, dtype=torch.float64)
    xi = torch.randn(256, 3, dtype=torch.float64)
    torch.testing.assert_close(d.s, s)
    torch.testing.assert_close(d.t, t)
    (a_t, s_t), (a_s, s_s) = (tuple(v[:, None] for v in ALPHA_SIGMA["vp-cosine"](u)) for u in (t, s))
    torch.testing.assert_close(d.z_t, a_t * x + s_t * eps)
    (call,) = student.calls
    assert torch.equal(call["cond"], cond)
    torch.testing.assert_close(call["t"], t)
    torch.testing.assert_close(d.x_tilde, call["out"])
    a_ts = a_t / a_s
    s_ts2 = (s_t**2 - a_ts**2 * s_s**2).clamp(min=0)
    mean = (a_ts * s_s**2 * d.z_t + a_s * s_ts2 * d.x_tilde) / s_t**2
    torch.testing.assert_close(d.z_s, mean + (s_ts2 * s_s**2 / s_t**2).sqrt() * xi)


@pytest.mark.parametrize("guidance", [None, 3.0])
def test_mm_teacher_fit_loss(guidance):
    """The initial fit: t over the whole range, z_t = alpha x + sigma eps, target the teacher's (guided) x0, EDM
    weight at t with the teacher's sigma_data whatever objective.weighting is, on the network being fitted."""
    from plugins.moment_matching import MMConfig, MomentMatching

    sched = make_schedule("edm")
    teacher, net = GuidedRecordingNet(sched, 2, seed=50, sigma_data=0.9), RecordingNet(sched, 2, seed=51)
    obj = MomentMatching(MMConfig(guidance=guidance, weighting="flat"))
    x, cond = torch.randn(128, 2, dtype=torch.float64), torch.randint(0, 4, (128,))
    ctx = Context({"teacher": teacher, "student": net, "critic": net}, {"x": x, "cond": cond}, 0, 128, "cpu")
    torch.manual_seed(9)
    loss, metrics = obj.fit_loss(net, ctx)
    torch.manual_seed(9)
    t = (0.002 ** (1 / 7) + torch.rand(128, dtype=torch.float64) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    eps = torch.randn(128, 2, dtype=torch.float64)
    (tcall,), (ncall,) = teacher.calls, net.calls
    assert tcall["guidance"] == (2.5 if guidance is None else guidance)
    torch.testing.assert_close(tcall["t"], t)
    torch.testing.assert_close(ncall["x_t"], x + t[:, None] * eps)
    lam = (t**2 + 0.81) / (t * 0.9) ** 2
    want = (lam * (ncall["out"] - tcall["out"]).square().mean(1)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["teacher_fit"], want, rtol=1e-12, atol=0)
    # without labels the teacher is called unguided, whatever the scale
    teacher.calls.clear()
    obj.fit_loss(net, Context(ctx.nets, {"x": x, "cond": None}, 0, 128, "cpu"))
    assert teacher.calls[0]["guidance"] is None


# -- SFD: the student's Euler chain against the teacher's trajectory ---------------------------------------------

@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_sfd_losses_against_the_closed_form_teacher_trajectory(kind, float64_default):
    """For N(0, V) data on EDM the teacher's PF-ODE trajectory from x(sigma_0) = sigma_0 z is
    x(sigma) = sigma_0 z sqrt((V + sigma^2) / (V + sigma_0^2)). SFD (paper Alg. 1) with AFS: the first student step
    is analytic (D = y (1 - s / sqrt(1 + s^2))), then each Euler step x' = r x + (1 - r) D_student(x) from the
    student's own detached previous output, r = sigma'/sigma, is one loss against the trajectory at sigma'. The
    student grid: 4 Karras points (rho 7) from 80 down to SFD's sigma_min 0.006."""
    B, V = 512, GaussianTeacher.V
    teacher, student = GaussianTeacher(), RecordingNet(make_schedule("edm"), 2, seed=60)
    obj = _objective("sfd", nfe=2, substeps=40, loss=kind)
    nets = {"teacher": teacher, "student": student}
    obj.build(nets)
    torch.manual_seed(4)
    losses = [loss for loss, _ in obj.loss("student", Context(nets, {"x": None, "cond": None}, 0, B, "cpu"))]
    torch.manual_seed(4)
    z = torch.randn(B, 2)
    sig = (80 ** (1 / 7) + torch.arange(4, dtype=torch.float64) / 3 * (0.006 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    traj = [sig[0] * z * torch.sqrt((V + s**2) / (V + sig[0] ** 2)) for s in sig]
    s0 = float(sig[0])
    x = traj[0] * (sig[1] / sig[0]) + (1 - sig[1] / sig[0]) * traj[0] * (1 - s0 / math.sqrt(1 + s0 * s0))
    assert len(losses) == 2 and len(student.calls) == 2
    for i, (loss, call) in enumerate(zip(losses, student.calls), start=1):
        torch.testing.assert_close(call["x_t"], x)
        torch.testing.assert_close(call["t"], sig[i].expand(B))
        r = sig[i + 1] / sig[i]
        x = r * x + (1 - r) * call["out"]
        err = x - traj[i + 1]
        want = err.square().mean() if kind == "l2" else err.abs().mean()
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=0)


def test_denoise_on_float32_data_stays_float32():
    """sigma is drawn in float64, but the network sees float32 times and the loss (and its weight) is float32."""
    net = RecordingNet(make_schedule("vp-cosine"), 2, seed=70)
    x0 = torch.randn(64, 2)
    loss, _ = _objective("denoise").loss("denoiser", Context({"student": net}, {"x": x0, "cond": None}, 0, 64, "cpu"))
    assert net.calls[0]["t"].dtype == torch.float32 and net.calls[0]["x_t"].dtype == torch.float32
    assert loss.dtype == torch.float32
