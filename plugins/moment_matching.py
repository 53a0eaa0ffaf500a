"""Moment matching distillation (Salimans, Mensink, Heek, Hoogeboom, NeurIPS 2024, arXiv 2406.04103).

A k-step stochastic student g_eta is trained so that its conditional means match the teacher's along
the sampling path:  E_g[x~ | z_s] = E_q[x | z_s],  x~ = g_eta(z_t, t),  z_s ~ q(z_s | z_t, x = x~), s < t.

- ``mm``: Algorithm 2. An auxiliary denoiser g_phi (the ``fake-score`` critic) estimates E_g[x~ | z_s];
  auxiliary and generator updates alternate, and the generator's gradient is w(s) (dx~/deta)^T (g_phi - g_theta).
- ``mm-param``: Algorithm 3. No auxiliary: the teacher's parameter gradient on generated data (batch A),
  preconditioned, is contracted with the teacher's parameter Jacobian on batch B through x~ (a JVP).

The paper released no code. What is reconstructed rather than read from the paper (see
docs/methods/moment_matching.md): the time map for non-[0, 1] schedules, the weightings, the guidance
placement, the optimizer settings, Algorithm 3's estimator, preconditioner and sign.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import attrs
import torch
from torch import Tensor

from core import hookimpl, ops
from core.config import non_negative, positive, unit_interval
from core.errors import UsageError
from core.parameterization import edm_weight
from core.protocols import Phase, SamplingSpec, sigma_data_of
from core.timesteps import fraction_grid, step_fraction, ve_sigma

WEIGHTINGS = ("edm", "flat", "snr", "snr+1")
GRID_DOC = ("the k-step grid i/k on EDM schedules: refine (the steps after the first at fractions 1/2 .. 1/4, "
            "sigma = 80, 2.5, 0.74, 0.17 for k = 4, so that they refine rather than start over) or paper (i/k through "
            "EDM's rho-spacing: 80, 17.5, 2.5, 0.17). The same on other schedules")


# ---------------------------------------------------------------------------------------------------
# Shared pieces: time sampling, weighting, one draw of (z_t, x~, z_s).

def sample_times(schedule, n: int, steps: int, mode: str = "continuous", device=None,
                 refine: bool = False) -> tuple[Tensor, Tensor]:
    """(s, t) in the schedule's units, float64 [n].

    continuous (paper): s ~ U(0, 1), t = min(1, s + U(0, 1/k)).  grid (Dual-Rate's variant): t = i/k with
    i ~ U{1..k}, s ~ U(t - 1/k, t). Fractions map to times through ``schedule.t_from_fraction``, with
    ``refine`` through ``core.timesteps.step_fraction`` first (the sampling grid's warp, so training still
    draws each step's own interval).
    """
    if mode == "grid":
        u_t = torch.randint(1, steps + 1, (n,), device=device).double() / steps
        u_s = u_t - torch.rand(n, dtype=torch.float64, device=device) / steps
    else:
        u_s = torch.rand(n, dtype=torch.float64, device=device)
        u_t = (u_s + torch.rand(n, dtype=torch.float64, device=device) / steps).clamp(max=1.0)
    if refine:
        u_s, u_t = step_fraction(schedule, u_s, steps), step_fraction(schedule, u_t, steps)
    return schedule.t_from_fraction(u_s), schedule.t_from_fraction(u_t)


def loss_weight(schedule, s: Tensor, kind: str, sigma_data: float) -> Tensor:
    """w(s) for an x-space loss, evaluated at s (not t). With sigma = exp(-logSNR/2) (the VE sigma):
    edm: (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (Karras et al. 2022, eq. 8); flat: 1;
    snr: alpha^2/sigma^2 (the eps-loss); snr+1: the v-loss."""
    if kind == "edm":
        return edm_weight(ve_sigma(schedule, s), sigma_data)
    snr = torch.exp(schedule.logsnr(s))
    if kind == "flat":
        return torch.ones_like(snr)
    if kind == "snr":
        return snr
    if kind == "snr+1":
        return snr + 1
    raise UsageError(f"unknown weighting '{kind}'; choose one of: {', '.join(WEIGHTINGS)}")


class Draw(NamedTuple):
    s: Tensor  # [B] float64, schedule units
    t: Tensor
    z_t: Tensor
    x_tilde: Tensor
    z_s: Tensor
    noise: Tensor  # the posterior draw's xi [B, ...] float64, so a data-side z_s can share it


def draw(student, x: Tensor, cond, steps: int, eta: float = 1.0, mode: str = "continuous",
         refine: bool = False) -> Draw:
    """Alg. 2, lines 2-5: z_t ~ q(z_t | x) from real data, x~ = g_eta(z_t, t), z_s ~ q(z_s | z_t, x = sg(x~)).

    x~ carries the student's graph when grad is enabled; z_s never does (the posterior gets sg(x~))."""
    sched = student.schedule
    s, t = sample_times(sched, x.shape[0], steps, mode, x.device, refine)
    z_t = ops.add_noise(x, torch.randn_like(x), sched.alpha(t), sched.sigma(t))
    x_tilde = student.denoise(z_t, t.to(x.dtype), cond)
    xi = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    z_s = ops.posterior_sample(z_t.detach().double(), x_tilde.detach().double(), sched.alpha(t), sched.sigma(t),
                               sched.alpha(s), sched.sigma(s), xi, eta).to(x.dtype)
    return Draw(s, t, z_t, x_tilde, z_s, xi)


def data_side(d: Draw, x: Tensor, sched, eta: float = 1.0) -> Tensor:
    """z_s ~ q(z_s | z_t, x) for the real x that ``d``'s z_t was diffused from, with ``d``'s own posterior noise:
    (x, z_s) is then a draw of the data's joint, coupled to the generated (x~, z_s) by common random numbers."""
    return ops.posterior_sample(d.z_t.detach().double(), x.double(), sched.alpha(d.t), sched.sigma(d.t),
                                sched.alpha(d.s), sched.sigma(d.s), d.noise, eta).to(x.dtype)


def _data(ctx) -> Tensor:
    x = ctx.batch.get("x")
    if x is None:
        hint = getattr(ctx.teacher, "real_data_hint", "data=NAME (e.g. data=gmm, or data=teacher-samples for a "
                                                       "checkpoint teacher)")
        raise UsageError(f"moment matching forward-diffuses real data, but this run has none; set {hint}")
    return x


def _steps_spec(student, steps: int, eta: float, grid: str) -> SamplingSpec:
    return SamplingSpec("ancestral", fraction_grid(student.schedule, steps, grid == "refine").tolist(), {"eta": eta})


# Paper-style optimizer (reconstruction: mm_3_retry's defaults): Adam beta1 = 0, beta2 = 0.99, eps = 1e-12,
# grad-norm clip 1, linear warm-up then linear decay to 0.
ADAM = {"betas": (0.0, 0.99), "eps": 1e-12, "grad_clip": 1.0}
TRAIN_DEFAULTS = {"warmup": 100, "lr_decay": "linear"}


# ---------------------------------------------------------------------------------------------------
# Algorithm 2: alternating optimisation with an auxiliary denoiser.

@attrs.define(kw_only=True)
class MMConfig:
    steps: int = attrs.field(default=4, validator=positive, metadata={"doc": "student sampling steps k"})
    lr: float | None = attrs.field(
        default=None, validator=positive,
        metadata={"doc": "generator learning rate (default: 1e-3 from scratch, i.e. with an analytic teacher; "
                         "1e-4 for copies of the teacher's network)"})
    aux_lr: float | None = attrs.field(default=None, validator=positive,
                                       metadata={"doc": "auxiliary learning rate (default: 5 x lr, two time-scale "
                                                        "updates at the paper's 1:1 alternation)"})
    aux_steps: int = attrs.field(default=1, validator=positive,
                                 metadata={"doc": "auxiliary updates per generator update (paper: 1)"})
    aux_teacher_weight: float = attrs.field(default=1.0, validator=non_negative,
                                            metadata={"doc": "weight of ||g_theta - g_phi||^2 in the auxiliary loss"})
    # Both defaults depart from the paper's reconstructed setting (edm, continuous); measured in
    # docs/methods/quality.md (eighth pass): with them MM from scratch keeps every mode of every preset, 3 seeds.
    weighting: Literal["edm", "flat", "snr", "snr+1"] = attrs.field(
        default="flat", metadata={"doc": "w(s): flat (default) or edm, which weights a step's clean end tens of "
                                         "times more than its noisy end, where the signal that keeps modes lives"})
    eta: float = attrs.field(default=1.0, validator=unit_interval,
                             metadata={"doc": "posterior noise of the training z_s draw (1: ancestral)"})
    sample_eta: float = attrs.field(default=1.0, validator=unit_interval, metadata={"doc": "eta when sampling"})
    time_sampling: Literal["continuous", "grid"] = attrs.field(
        default="grid", metadata={"doc": "t on the sampling grid i/k (default, Dual-Rate's variant: training goes "
                                         "to the times the student is sampled at) or continuous (the paper)"})
    grid: Literal["refine", "paper"] = attrs.field(default="refine", metadata={"doc": GRID_DOC})
    guidance: float | None = attrs.field(default=None, metadata={"doc": "CFG scale of the teacher term "
                                                                        "(default: the teacher's own)"})
    teacher_fit: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0)),
        metadata={"doc": "first iterations that fit generator and auxiliary to the teacher's x-prediction, since "
                         "Alg. 2 starts both as copies of the teacher (default: 600 with an analytic teacher, "
                         "which has no network to copy; 0 otherwise)"})


class MomentMatching:
    """Moment matching, Algorithm 2 (Salimans et al. 2024): auxiliary denoiser g_phi alternated with the
    generator g_eta; generator gradient w(s) (dx~/deta)^T (g_phi(z_s) - g_theta(z_s))."""

    needs_critic = True

    def __init__(self, config: MMConfig):
        self.config = config

    def build(self, nets):
        self.analytic = bool(getattr(nets["teacher"], "analytic", False))  # no network: G and g_phi start fresh
        fit = self.config.teacher_fit
        self.fit_iterations = (600 if self.analytic else 0) if fit is None else fit
        return {}

    def fit_loss(self, net, ctx) -> tuple[Tensor, dict]:
        """lambda_edm(t) ||g(z_t, t) - g_theta(z_t, t)||^2 on forward-diffused data, t over the whole range: makes
        ``net`` a copy of the teacher's denoiser, the initialisation Alg. 2 prescribes for generator and auxiliary."""
        x, cond = _data(ctx), ctx.batch["cond"]
        sched = ctx.student.schedule
        t = sched.t_from_fraction(torch.rand(x.shape[0], dtype=torch.float64, device=x.device))
        z_t = ops.add_noise(x, torch.randn_like(x), sched.alpha(t), sched.sigma(t))
        with torch.no_grad():
            target = self.teacher_x0(ctx.teacher, z_t, t, cond)
        # EDM's lambda whatever objective.weighting says: this is a denoiser regression, which it balances over sigma
        w = loss_weight(sched, t, "edm", float(sigma_data_of(ctx.teacher, ctx.student))).to(x.dtype)
        fit = ops.weighted_loss(net.denoise(z_t, t.to(x.dtype), cond), target, w)
        return fit, {"teacher_fit": fit.detach()}

    def phases(self):
        c = self.config
        # even iterations: auxiliary (aux_steps optimizer steps); odd: generator, as in the paper's loop.
        return [Phase("auxiliary", trains=("critic",), every=2, offset=0, repeats=c.aux_steps,
                      lr=c.aux_lr or 5 * self.lr, **ADAM),
                Phase("generator", trains=("student",), every=2, offset=1, lr=self.lr, **ADAM)]

    @property
    def lr(self) -> float:
        if self.config.lr is not None:
            return self.config.lr
        return 1e-3 if getattr(self, "analytic", False) else 1e-4

    def teacher_x0(self, teacher, z_s: Tensor, s: Tensor, cond):
        """g_theta(z_s, s), guided when a scale is set (the auxiliary stays unguided)."""
        g = self.config.guidance if self.config.guidance is not None else getattr(teacher, "guidance", None)
        if cond is not None and g is not None and g != 1:
            return teacher.denoise(z_s, s.to(z_s.dtype), cond, guidance=g)
        return teacher.denoise(z_s, s.to(z_s.dtype), cond)

    def loss(self, phase, ctx):
        c, nets = self.config, ctx.nets
        x, cond = _data(ctx), ctx.batch["cond"]
        student, aux = nets["student"], nets["critic"]
        w_kind, sd = c.weighting, float(sigma_data_of(nets["teacher"], nets["student"]))
        if ctx.iteration < getattr(self, "fit_iterations", 0):
            return self.fit_loss(aux if phase == "auxiliary" else student, ctx)
        if phase == "auxiliary":
            with torch.no_grad():
                d = draw(student, x, cond, c.steps, c.eta, c.time_sampling, c.grid == "refine")
                teacher = self.teacher_x0(ctx.teacher, d.z_s, d.s, cond)
            w = loss_weight(student.schedule, d.s, w_kind, sd).to(x.dtype)
            aux_x0 = aux.denoise(d.z_s, d.s.to(x.dtype), cond)
            fit = ops.weighted_loss(aux_x0, d.x_tilde, w)  # ||sg(x~) - g_phi(z_s)||^2
            reg = ops.weighted_loss(aux_x0, teacher, w)  # ||g_theta(z_s) - g_phi(z_s)||^2
            return fit + c.aux_teacher_weight * reg, {"fit": fit.detach(), "reg": reg.detach()}
        d = draw(student, x, cond, c.steps, c.eta, c.time_sampling, c.grid == "refine")
        with torch.no_grad():
            aux_x0 = aux.denoise(d.z_s, d.s.to(x.dtype), cond)
            teacher = self.teacher_x0(ctx.teacher, d.z_s, d.s, cond)
        w = loss_weight(student.schedule, d.s, w_kind, sd).to(x.dtype)
        loss = ops.mm_generator_loss(d.x_tilde, aux_x0, teacher, w)
        gap = ops.weighted_loss(aux_x0, teacher, w)
        return loss, {"moment_gap": gap.detach()}

    def sampling(self, student):
        return _steps_spec(student, self.config.steps, self.config.sample_eta, self.config.grid)

    def with_steps(self, spec, steps, student):
        return _steps_spec(student, steps, spec.options.get("eta", self.config.sample_eta), self.config.grid)


# ---------------------------------------------------------------------------------------------------
# Algorithm 3: moment matching in parameter space (no auxiliary network).

@attrs.define(kw_only=True)
class MMParamConfig:
    steps: int = attrs.field(default=4, validator=positive, metadata={"doc": "student sampling steps k"})
    lr: float = attrs.field(default=1e-4, validator=positive, metadata={"doc": "generator learning rate"})
    weighting: Literal["edm", "flat", "snr", "snr+1"] = attrs.field(default="edm", metadata={"doc": "w(s)"})
    eta: float = attrs.field(default=1.0, validator=unit_interval,
                             metadata={"doc": "posterior noise of the training z_s draw (1: ancestral)"})
    sample_eta: float = attrs.field(default=1.0, validator=unit_interval, metadata={"doc": "eta when sampling"})
    time_sampling: Literal["continuous", "grid"] = attrs.field(default="continuous")
    grid: Literal["refine", "paper"] = attrs.field(default="refine", metadata={"doc": GRID_DOC})
    precond: Literal["identity", "rms"] = attrs.field(
        default="identity", metadata={"doc": "Lambda: identity (measured steadier on the mixtures), or a running "
                                             "Adam-style RMS of the teacher gradient"})
    precond_beta: float = attrs.field(default=0.99, validator=unit_interval,
                                      metadata={"doc": "EMA decay of the second moment (rms)"})
    precond_eps: float = attrs.field(default=1e-8, validator=positive)
    jvp: Literal["auto", "forward", "fd"] = attrs.field(
        default="auto", metadata={"doc": "J_theta nu via torch.func.jvp (forward), central differences (fd), "
                                         "or forward with fd fallback (auto)"})
    fd_step: float = attrs.field(default=1e-3, validator=positive,
                                 metadata={"doc": "fd step as a fraction of ||theta|| / ||nu||"})
    # fewstep's default, not the paper's: a teacher is rarely at a stationary point of l under MM's time draws and
    # weighting, and matching to 0 then drifts with training (docs/methods/quality.md, thirteenth pass).
    data_moment: bool = attrs.field(
        default=True, metadata={"doc": "match E_g[grad_theta l] to the teacher's gradient on real data (from each "
                                       "batch; default) or to 0 (false: the paper's value, right only for a teacher "
                                       "at a stationary point of l)"})


class _Denoise(torch.nn.Module):
    """forward = denoise, so ``torch.func.functional_call`` reaches any denoiser module."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_t, t, cond=None):
        return self.net.denoise(x_t, t, cond)


class SecondMoment(torch.nn.Module):
    """Running diagonal second moment of the teacher's parameter gradient (Adam's v, bias-corrected).
    A module of buffers only, so checkpoints carry it and resumes are exact."""

    def __init__(self, params: dict, beta: float, eps: float):
        super().__init__()
        self.beta, self.eps = beta, eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        for i, p in enumerate(params.values()):
            self.register_buffer(f"v{i}", torch.zeros_like(p))

    @torch.no_grad()
    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        """Update v with g^2, return g / (sqrt(v_hat) + eps)."""
        self.count += 1
        correction = 1 - self.beta ** self.count  # a 0-d tensor: no host sync in the training step
        out = []
        for i, g in enumerate(grads):
            v = getattr(self, f"v{i}")
            v.mul_(self.beta).addcmul_(g, g, value=1 - self.beta)
            out.append(g / ((v / correction).sqrt() + self.eps))
        return out


class MomentMatchingParam:
    """Moment matching in parameter space, Algorithm 3 (Salimans et al. 2024; estimator reconstructed):
    nu = Lambda^-1 grad_theta l(theta; batch A), generator surrogate nu^T grad_theta l(theta; batch B)
    differentiated through x~_B only, via the JVP J_theta(z_s) nu."""

    needs_critic = False

    def __init__(self, config: MMParamConfig):
        self.config = config
        self.model = None

    def build(self, nets):
        net = nets["teacher"].trainable_copy()
        if net is None:
            raise UsageError(f"objective=mm-param differentiates the teacher's parameters, and "
                             f"{type(nets['teacher']).__name__} has no network; use a network teacher "
                             "(teacher=checkpoint teacher.path=RUN) or objective=mm")
        device = next(nets["student"].parameters()).device
        self.model = _Denoise(net).to(device).eval().requires_grad_(False)
        self.theta = {k: p.detach() for k, p in self.model.named_parameters()}
        if self.config.precond == "rms":
            self.moments = SecondMoment(self.theta, self.config.precond_beta, self.config.precond_eps)
            return {"mm_precond": self.moments}
        self.moments = None
        return {}

    def phases(self):
        return [Phase("generator", trains=("student",), lr=self.config.lr, **ADAM)]

    def _f(self, params: dict, z_s: Tensor, s: Tensor, cond):
        return torch.func.functional_call(self.model, params, (z_s, s.to(z_s.dtype), cond))

    def parameter_direction(self, d: Draw, w: Tensor, cond, data: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
        """nu = Lambda^-1 (grad_theta mean_A w ||x~_A - g_theta(z_s,A)||^2 - m_q) (the teacher is never stepped), m_q
        the same gradient on real data at ``data`` = (x_A, z_s,A), or 0 without it."""
        params = {k: p.detach().requires_grad_(True) for k, p in self.theta.items()}
        with torch.enable_grad():
            loss = ops.weighted_loss(self._f(params, d.z_s, d.s, cond), d.x_tilde.detach(), w)
            if data is not None:
                loss = loss - ops.weighted_loss(self._f(params, data[1], d.s, cond), data[0], w)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.theta.values())]
        return self.moments.precondition(grads) if self.moments is not None else grads

    def jvp(self, nu: list[Tensor], z_s: Tensor, s: Tensor, cond) -> tuple[Tensor, Tensor]:
        """(g_theta(z_s), J_theta(z_s) nu): forward-mode AD, or central differences (the 'instant
        auxiliary' g_{theta +- eps nu}) where forward mode is unsupported (e.g. fused attention)."""
        tangent = dict(zip(self.theta, nu))
        mode = self.config.jvp
        if mode in ("auto", "forward"):
            try:
                with torch.no_grad():
                    return torch.func.jvp(lambda p: self._f(p, z_s, s, cond), (self.theta,), (tangent,))
            except (NotImplementedError, RuntimeError) as exc:
                if mode == "forward":
                    raise
                from core.registry import warn

                warn(f"mm-param: forward-mode JVP failed ({type(exc).__name__}); using finite differences")
                self.config = attrs.evolve(self.config, jvp="fd")  # once, not every step
        theta_norm = torch.sqrt(sum(p.double().square().sum() for p in self.theta.values()))
        nu_norm = torch.sqrt(sum(v.double().square().sum() for v in nu)).clamp(min=1e-30)
        eps = self.config.fd_step * (theta_norm + 1) / nu_norm  # a 0-d tensor: no host sync
        with torch.no_grad():
            plus = self._f({k: p + eps * tangent[k] for k, p in self.theta.items()}, z_s, s, cond)
            minus = self._f({k: p - eps * tangent[k] for k, p in self.theta.items()}, z_s, s, cond)
            return self._f(self.theta, z_s, s, cond), (plus - minus) / (2 * eps)

    def loss(self, phase, ctx):
        c, student = self.config, ctx.student
        x, cond = _data(ctx), ctx.batch["cond"]
        if x.shape[0] < 2:
            raise UsageError("objective=mm-param splits each batch into two independent halves; use train.batch >= 2")
        half = x.shape[0] // 2
        cond_a, cond_b = (None, None) if cond is None else (cond[:half], cond[half:])
        sched, sd = student.schedule, float(sigma_data_of(ctx.teacher, ctx.student))
        with torch.no_grad():  # batch A: only the teacher's parameter gradient, no student graph
            a = draw(student, x[:half], cond_a, c.steps, c.eta, c.time_sampling, c.grid == "refine")
        # the moment to match is the teacher's gradient on real data: 0 only at a stationary point of the loss
        data_a = (x[:half], data_side(a, x[:half], sched, c.eta)) if c.data_moment else None
        nu = self.parameter_direction(a, loss_weight(sched, a.s, c.weighting, sd).to(x.dtype), cond_a, data_a)
        b = draw(student, x[half:], cond_b, c.steps, c.eta, c.time_sampling, c.grid == "refine")
        w_b, k, reps = loss_weight(sched, b.s, c.weighting, sd).to(x.dtype), x.shape[0] - half, 1 + c.data_moment
        z_data = data_side(b, x[half:], sched, c.eta) if c.data_moment else b.z_s[:0]  # one JVP over both z_s
        g_all, jv_all = self.jvp(nu, torch.cat([b.z_s, z_data]), b.s.repeat(reps),
                                 None if cond_b is None else torch.cat([cond_b] * reps))
        teacher_b, jv = g_all[:k], jv_all[:k]
        # nu^T grad_theta mean_B w ||x~_B - g_theta||^2 has x~-gradient -2 w J nu / (B D): Alg. 2's generator
        # loss with the instant auxiliary g_phi = g_theta - 2 J nu (one preconditioned step from theta).
        loss = ops.mm_generator_loss(b.x_tilde, teacher_b - 2 * jv, teacher_b, w_b)
        # unbiased estimate of ||E_g grad_theta l - m_q||^2_{Lambda^-1} (A and B independent)
        moment = -2 * w_b * ((b.x_tilde.detach() - teacher_b) * jv).flatten(1).mean(1)
        if c.data_moment:
            moment = moment + 2 * w_b * ((x[half:] - g_all[k:]) * jv_all[k:]).flatten(1).mean(1)
        return loss, {"moment_norm": moment.mean()}

    def sampling(self, student):
        return _steps_spec(student, self.config.steps, self.config.sample_eta, self.config.grid)

    def with_steps(self, spec, steps, student):
        return _steps_spec(student, steps, spec.options.get("eta", self.config.sample_eta), self.config.grid)


@hookimpl
def register_objectives(register):
    register("mm", MomentMatching, config=MMConfig, default_critic="fake-score", train_defaults=TRAIN_DEFAULTS)
    register("mm-param", MomentMatchingParam, config=MMParamConfig, train_defaults=TRAIN_DEFAULTS)
