"""Objectives ``sfd``, ``sfd-v`` and ``sfd-1``: Simple and Fast Distillation (Zhou et al., NeurIPS 2024,
arXiv 2409.19681).

SFD fine-tunes a copy of the teacher's own network so that a few plain Euler steps land on the states of
an accurate teacher solver at the same times. Per iteration (paper Alg. 1, docs/methods/sfd.md):

1. from fresh noise x_T = sigma_max z, run the teacher solver (DPM-Solver++(3M)) without grad on the fine
   grid of M extra timestamps per student interval; its states at every (M+1)-th timestamp are the
   targets y_1 .. y_{N-1};
2. for each student step i in order: x~_{i+1} = EulerStep_student(sg(x~_i), t_i -> t_{i+1}) and
   L_i = ||x~_{i+1} - y_{i+1}||_1, one optimizer step per L_i (``loss`` yields each L_i in turn);
3. with AFS the first step is analytic: no network call, no loss, no update.

``sfd-v`` draws the NFE per iteration from [nfe_min, nfe_max] and feeds it to the student through
zero-initialised embedding layers (``student=copy-nfe``), so one network serves every NFE in the range
and starts exactly equal to the teacher. ``sfd-1`` is the second stage (note sec. 7): NFE 1 (N = 3, M = 2)
from a first-stage SFD/SFD-v run that takes its own Euler + AFS steps (NFE 5), L1 plus an optional LPIPS
term on the last step (``plugins.perceptual``).
"""

from __future__ import annotations

import inspect
import math
import typing

import attrs
import torch
from torch import nn

from core import files, hookimpl, ops
from core.config import FieldError, positive
from core.errors import UsageError
from core.pfode import PFODE
from core.protocols import Phase, SamplingSpec, sigma_data_of
from core.registry import get_registry, warn
from core.timesteps import nested_grids, ve_sigma
from plugins.perceptual import load_lpips, lpips_term


@attrs.define(kw_only=True)
class SFDConfig:
    nfe: int = attrs.field(default=2, validator=positive, metadata={"doc": "student network calls (NFE)"})
    substeps: int = attrs.field(default=3, validator=attrs.validators.ge(0),
                                metadata={"doc": "M: teacher timestamps inserted per student step"})
    teacher_solver: typing.Literal["dpmpp-3m", "dpmpp-2m", "heun", "ipndm", "euler-afs"] = attrs.field(
        default="dpmpp-3m", metadata={"doc": "teacher ODE solver on the fine grid (AFS off)"})
    loss: typing.Literal["l1", "l2"] = attrs.field(default="l1", metadata={"doc": "trajectory-matching distance"})
    sigma_min: float | None = attrs.field(
        default=None, validator=positive,
        metadata={"doc": "grid t_min as VE sigma = sigma/alpha (default: the paper's 0.006, raised to the "
                         "schedule's lowest sigma, e.g. ~0.029 on SD)"})
    sigma_max: float | None = attrs.field(default=None, validator=positive,
                                          metadata={"doc": "t_max as VE sigma (default: the schedule's t_max)"})
    grid: typing.Literal["polynomial", "logsnr", "uniform"] = attrs.field(default="polynomial")
    rho: float = attrs.field(default=7.0, validator=positive, metadata={"doc": "polynomial grid exponent"})
    afs: bool = attrs.field(default=True, metadata={"doc": "analytical first student step (saves one NFE)"})
    lr: float = attrs.field(default=1e-3, validator=positive,
                            metadata={"doc": "Adam lr (tuned on the MLP mixtures; paper: 5e-5 on EDM UNets)"})

    def __attrs_post_init__(self):
        if self.sigma_max is not None and self.sigma_min is not None and self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")


@attrs.define(kw_only=True)
class SFDVConfig(SFDConfig):
    nfe_min: int = attrs.field(default=2, validator=positive, metadata={"doc": "smallest NFE drawn per iteration"})
    nfe_max: int = attrs.field(default=5, validator=positive, metadata={"doc": "largest NFE drawn per iteration"})

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        if not self.nfe_min <= self.nfe <= self.nfe_max:
            raise ValueError(f"nfe={self.nfe} (the default sampling NFE) must lie in [nfe_min, nfe_max] = "
                             f"[{self.nfe_min}, {self.nfe_max}]")


@attrs.define(kw_only=True)
class SFD1Config(SFDConfig):
    """The second stage (note sec. 7): a 1-NFE student (N = 3, M = 2) distilled from a first-stage SFD or
    SFD-v model (``teacher=checkpoint teacher.path=RUN``) that runs its own Euler steps on the 7-point grid."""

    nfe: int = attrs.field(default=1, validator=positive, metadata={"doc": "student network calls (NFE)"})
    substeps: int = attrs.field(default=2, validator=attrs.validators.ge(0),
                                metadata={"doc": "M: teacher timestamps inserted per student step"})
    teacher_solver: typing.Literal["euler-afs", "dpmpp-3m", "dpmpp-2m", "heun", "ipndm"] = attrs.field(
        default="euler-afs", metadata={"doc": "the first-stage model's solver on the fine grid"})
    teacher_afs: bool = attrs.field(default=True, metadata={
        "doc": "the first-stage model's analytical first step (it was trained with it; euler-afs only)"})
    lpips_path: str = attrs.field(default="", metadata={
        "doc": "LPIPS-VGG weights (state dict of lpips.LPIPS(net='vgg')) for an LPIPS term on the last step "
               "of image students; never downloaded"})
    lpips_weight: float = attrs.field(default=1.0, validator=attrs.validators.ge(0), metadata={
        "doc": "LPIPS weight against the per-element mean L1 (1 = the reference's sum-L1 + C*H*W*LPIPS, rescaled)"})

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        if self.lpips_path and not files.exists(self.lpips_path):
            raise ValueError(f"lpips_path={self.lpips_path}: no such file; pass the LPIPS-VGG weights file "
                             "(docs/methods/sfd.md) or drop objective.lpips_path")


class SFD:
    """SFD: Euler steps of a teacher copy regressed onto the teacher's DPM-Solver++(3M) trajectory. With an
    ``SFDVConfig`` (``sfd-v``) the NFE is drawn per iteration from [nfe_min, nfe_max] and fed to the student."""

    needs_critic = False

    def __init__(self, config: SFDConfig):
        self.config = config
        self.conditioned = isinstance(config, SFDVConfig)
        self.nfe_range = (config.nfe_min, config.nfe_max) if self.conditioned else (config.nfe, config.nfe)
        self.second_stage = isinstance(config, SFD1Config)
        # the first stage runs the pretrained network's solver without AFS; the second stage runs the
        # first-stage model as it samples, AFS included
        euler = config.teacher_solver == "euler-afs"
        self.teacher_options = {"afs": self.second_stage and config.teacher_afs} if euler else {}
        self.teacher_model, self.lpips = None, None

    # -- set-up ------------------------------------------------------------------------------------
    def build(self, nets):
        teacher, student = nets["teacher"], nets["student"]
        if self.conditioned and not isinstance(student, NFEConditioned):
            raise UsageError("objective=sfd-v needs a step-conditioned student; pass student=copy-nfe")
        if teacher.schedule.config() != student.schedule.config():
            raise UsageError("objective=sfd needs the student on the teacher's schedule; use student=copy")
        _, fine = self._grids(student.schedule, self.nfe_range[0])  # validates sigma_min / sigma_max early
        # the teacher's solver is a sampler plugin (plugins/samplers/ode.py registers them)
        self.teacher_solver = get_registry().get("sampler", self.config.teacher_solver).factory
        if self.second_stage:
            self.teacher_model = FirstStage(teacher, len(fine) - 1 - int(self.teacher_options.get("afs", False)))
            if self.config.lpips_path:
                if len(teacher.data_shape) != 3:
                    raise UsageError(f"objective.lpips_path needs image data (C, H, W); this teacher's samples have "
                                     f"shape {tuple(teacher.data_shape)}: drop objective.lpips_path")
                self.lpips = load_lpips(self.config.lpips_path, next(student.parameters()).device)
        return {}

    def phases(self):
        # one Adam step per student step (paper sec. 3.2): loss() yields one loss per student step
        return [Phase("student", trains=("student",), lr=self.config.lr)]

    def _grids(self, schedule, nfe: int):
        """Student grid (N = nfe + 1 timestamps, + 1 with AFS) and the teacher's refined grid, both ending
        at sigma_min with no denoise-to-zero (paper sec. 3.1: N_tea = (M+1)(N-1)+1)."""
        c = self.config
        lo = float(ve_sigma(schedule, schedule.t_min))
        sigma_min = max(0.006, lo) if c.sigma_min is None else c.sigma_min
        if sigma_min < lo * (1 - 1e-9):
            raise UsageError(f"objective.sigma_min={sigma_min} is below the schedule's range (VE sigma {lo:.4g}); raise it")
        t_min = float(schedule.t_from_logsnr(torch.tensor(-2 * math.log(sigma_min), dtype=torch.float64)))
        t_max = None if c.sigma_max is None else float(
            schedule.t_from_logsnr(torch.tensor(-2 * math.log(c.sigma_max), dtype=torch.float64)))
        return nested_grids(schedule, nfe + 1 + int(c.afs), c.substeps, c.grid, c.rho, t_min, t_max)

    # -- sampling --------------------------------------------------------------------------------------
    def sampling(self, student):
        return self.with_steps(None, self.config.nfe, student)

    def with_steps(self, spec, steps, student):
        """Euler (+ AFS) on the student grid for ``steps`` network calls, no final denoise (paper sec. 3.4)."""
        lo, hi = self.nfe_range
        if spec is not None and not lo <= steps <= hi:
            warn(f"this student was distilled for NFE {lo}-{hi}; steps={steps} runs it off its training grid")
        coarse, _ = self._grids(student.schedule, steps)
        # an NFE-conditioned second-stage student (the copy of an SFD-v model) is conditioned on its own NFE
        conditioned = self.conditioned or isinstance(student, NFEConditioned)
        options = {"afs": self.config.afs, **({"model_kwargs": {"nfe": steps}} if conditioned else {})}
        return SamplingSpec("euler-afs", coarse.tolist(), options)

    # -- one iteration: paper Algorithm 1 ----------------------------------------------------------------
    def loss(self, phase, ctx):
        """The teacher's trajectory from fresh noise, then the student's own Euler chain: one loss per student
        step, each followed by an optimizer step (the runner's)."""
        c, teacher = self.config, ctx.teacher
        lo, hi = self.nfe_range
        nfe = lo if lo == hi else int(torch.randint(lo, hi + 1, ()))
        times, fine = self._grids(teacher.schedule, nfe)
        kwargs = {"nfe": nfe} if self.conditioned or isinstance(ctx.student, NFEConditioned) else {}
        with torch.no_grad():
            cond = ctx.batch.get("cond")
            if cond is None and getattr(teacher, "num_classes", 0):
                cond = teacher.encode_condition(torch.randint(0, teacher.num_classes, (ctx.batch_size,)))
            z = torch.randn(ctx.batch_size, *teacher.data_shape, device=ctx.device)
            _, trajectory = self.teacher_solver(self.teacher_model or teacher, z, fine, cond, return_trajectory=True,
                                                **self.teacher_options)
            targets = trajectory[::c.substeps + 1]  # y_0 .. y_N on the student grid
            x, first = targets[0], 0
            if c.afs:  # step 0 needs no network: take it analytically
                ode = PFODE(ctx.student, times, afs=True)
                x = ode.x(ode.euler(x / ode.alpha[0], ode.denoised(x / ode.alpha[0], 0), 0), 1)
                first = 1
        for i in range(first, len(times) - 1):
            ode = PFODE(ctx.student, times[i:i + 2], cond, None, kwargs)
            y = x.detach() / ode.alpha[0]  # the student's own previous output, detached (paper sec. 3.2)
            x = ode.x(ode.euler(y, ode.denoised(y, 0), 0), 1)
            loss = ops.weighted_loss(x, targets[i + 1], None, c.loss)
            if self.lpips is not None and i == len(times) - 2:  # the last step only (note sec. 7)
                loss = loss + c.lpips_weight * lpips_term(self.lpips, x, targets[i + 1])
            yield loss, {"nfe": nfe, f"step{i}": loss.detach()}


# -- the second stage's teacher ----------------------------------------------------------------------------
class FirstStage:
    """A first-stage SFD/SFD-v model as the second stage's teacher: its denoiser, conditioned on the NFE it
    runs at (``nfe``) when it is an SFD-v model."""

    def __init__(self, teacher, nfe: int):
        self.teacher, self.schedule, self.nfe = teacher, teacher.schedule, nfe
        net = getattr(teacher, "net", None)
        self.conditioned_net = net if isinstance(net, NFEConditioned) else None
        source = getattr(getattr(getattr(teacher, "run_config", None), "objective", None), "name", None)
        if source not in ("sfd", "sfd-v"):
            warn(f"objective=sfd-1 distils a first-stage SFD or SFD-v run; teacher.path holds a {source or 'non-run'} "
                 "teacher, which runs its plain Euler steps as the target")
        elif source == "sfd" and teacher.run_config.objective.config.nfe != nfe:
            warn(f"the first-stage SFD run was trained for NFE {teacher.run_config.objective.config.nfe}; "
                 f"the second stage runs it at NFE {nfe} (train it with objective.nfe={nfe}, or use sfd-v)")

    def denoise(self, x_t, t, cond=None, guidance=None):
        if self.conditioned_net is not None:
            return self.conditioned_net.denoise(x_t, t, cond, nfe=self.nfe)
        return self.teacher.denoise(x_t, t, cond, guidance)


# -- SFD-v's student -----------------------------------------------------------------------------------
class NFEConditioned(nn.Module):
    """The teacher's network plus an NFE embedding added to its time embedding (``extra_emb``).

    The embedding is sinusoidal features of the NFE through a two-layer MLP whose output layer starts at
    zero, so the initial student equals the teacher (an extension of SFD-v, which uses a FiLM per block
    with default initialisation). ``denoise(..., nfe=None)`` runs the unconditioned network.
    """

    def __init__(self, net: nn.Module, emb_dim: int = 32):
        super().__init__()
        backbone = getattr(net, "backbone", None)
        if backbone is None or "extra_emb" not in inspect.signature(backbone.forward).parameters:
            raise UsageError("student=copy-nfe needs a teacher network whose backbone takes extra_emb "
                             "(core.networks.ResidualMLP, plugins.unet); this teacher's does not")
        width = getattr(backbone, "emb_width", None) or backbone.time[-1].out_features
        self.net, self.schedule = net, net.schedule
        self.sigma_data = sigma_data_of(net)
        self.register_buffer("freqs", torch.exp(-math.log(100.0) * torch.arange(emb_dim // 2) / (emb_dim // 2)))
        self.nfe_embed = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.zeros_(self.nfe_embed[-1].weight)
        nn.init.zeros_(self.nfe_embed[-1].bias)

    def forward(self, x_t, t, cond=None, **kwargs):
        return self.denoise(x_t, t, cond, **kwargs)

    def denoise(self, x_t, t, cond=None, nfe=None, **kwargs):
        if nfe is None:
            return self.net.denoise(x_t, t, cond, **kwargs)
        return self.net.denoise(x_t, t, cond, extra_emb=self.nfe_embedding(nfe, x_t.shape[0], x_t.device), **kwargs)

    def nfe_embedding(self, nfe: int, batch: int, device) -> torch.Tensor:
        """[batch, width]: what ``denoise(..., nfe=nfe)`` adds to the time embedding (exports fold it in)."""
        angle = torch.full((batch, 1), float(nfe), device=device) * self.freqs[None]
        return self.nfe_embed(torch.cat([angle.cos(), angle.sin()], dim=1))


def positive_even(instance, attribute, value):
    if value <= 0 or value % 2:  # a cos and a sin per frequency: an odd size would not meet nfe_embed's input
        raise FieldError(attribute.name, f"must be an even number > 0 (a cos and a sin per frequency), got {value}")


@attrs.define(kw_only=True)
class CopyNFEConfig:
    emb_dim: int = attrs.field(default=32, validator=positive_even, metadata={"doc": "sinusoidal NFE features (even)"})


def copy_nfe_student(config: CopyNFEConfig, teacher, device="cpu"):
    """A trainable copy of the teacher's network with zero-initialised NFE conditioning (SFD-v)."""
    net = teacher.trainable_copy()
    if net is None:
        raise UsageError(f"student=copy-nfe needs a teacher with a network; {type(teacher).__name__} has none")
    return NFEConditioned(net, config.emb_dim).to(device)


@hookimpl
def register_objectives(register):
    # cosine decay stands in for the paper's "lr / 10 at half the run" (the runner's schedules)
    register("sfd", SFD, config=SFDConfig, train_defaults={"steps": 150, "batch": 128, "lr_decay": "cosine"})
    register("sfd-v", SFD, config=SFDVConfig, default_student="copy-nfe",
             train_defaults={"steps": 300, "batch": 128, "lr_decay": "cosine"})
    register("sfd-1", SFD, config=SFD1Config, train_defaults={"steps": 300, "batch": 128, "lr_decay": "cosine"})


@hookimpl
def register_students(register):
    register("copy-nfe", copy_nfe_student, config=CopyNFEConfig)
