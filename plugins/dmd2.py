"""Objective ``dmd2``: Improved Distribution Matching Distillation (Yin et al. 2024, arXiv 2405.14867).

One iteration n (method note sec. 3, the paper's Algorithm 1):
    input   = pure noise at tau_0, or for a K-step generator a backward-simulated state at tau_k (sec. 7)
    x       = G(input, tau_k, c)                                    the generator's one-step x0
    if n % r == 0:   L_G = lambda_DM L_DM(x) + lambda_G L_Gadv(x)   (sec. 4, 6)    -> step G
    every n:         L_C = L_fake(sg x) + lambda_D L_Dadv(sg x, x_real)   (sec. 5, 6) -> step F (and h)
with r = ``critic_updates`` (two time-scale updates, separate optimizers and learning rates). All arithmetic is
in the denoiser convention x0_hat(x_t, t, c), so eps-, v-, x0- and flow-parameterised teachers all work.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import Tensor

from core import distributed, gan, hookimpl, ops
from core.config import positive
from core.errors import UsageError
from core.networks import ResidualMLP
from core.parameterization import edm_weight
from core.protocols import Phase, SamplingSpec, sigma_data_of, time_batch
from core.generation import multistep, start
from core.registry import get_registry
from core.timesteps import fraction_grid, make_grid


def _fraction_range(instance, attribute, value):
    lo, hi = value
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"{attribute.name} must be two fractions 0 <= lo < hi <= 1, got {list(value)}")


@attrs.define(kw_only=True)
class DMD2Config:
    steps: int = attrs.field(default=1, validator=positive, metadata={"doc": "generator steps K"})
    timesteps: list[float] | None = attrs.field(
        default=None, metadata={"doc": "generator times tau_0 > .. > tau_{K-1} in schedule units (default: evenly "
                                       "spaced from t_max, 999/749/499/249 on 1000-step schedules; on EDM the "
                                       "steps after the first at fractions 1/2 .. 1/4, sigma 80, 2.5, 0.74, 0.17 "
                                       "for K = 4); [t] conditions a 1-step generator on t"})
    backward_simulation: bool = attrs.field(
        default=True, metadata={"doc": "K-step inputs from the generator's own rollout (off: noised real data)"})
    step_sampling: Literal["auto", "iteration", "stratified"] = attrs.field(
        default="auto",
        metadata={"doc": "which generator steps a K-step batch trains: iteration, one k ~ U{0..K-1} per iteration "
                         "for the whole batch (DMD2); stratified, every step in each batch, on B/K rows each, so "
                         "every generator update trains all K steps at the same cost (a batch of fewer than K rows "
                         "trains the steps in turn); auto: stratified for a "
                         "generator trained from scratch (analytic teacher), iteration for a teacher copy"})
    critic_updates: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(positive),
        metadata={"doc": "critic updates per generator update (TTUR ratio r; default: DMD2's 5 for a copy of the "
                         "teacher's network, 2 for a generator trained from scratch, whose regression loss "
                         "steadies it as in DMD's 1:1 recipe)"})
    guidance: float | None = attrs.field(default=None,
                                         metadata={"doc": "real-score CFG scale (default: the teacher's)"})
    dm_t_range: tuple[float, float] = attrs.field(
        default=(0.02, 0.98), validator=_fraction_range,
        metadata={"doc": "DM-loss t as fractions of the teacher's schedule (schedule.t_from_fraction)"})
    lr: float | None = attrs.field(
        default=None, validator=positive,
        metadata={"doc": "generator learning rate (default: 1e-3 for a generator trained from scratch, i.e. with an "
                         "analytic teacher, 1e-4 for a copy of the teacher's network)"})
    critic_lr: float | None = attrs.field(default=None, validator=positive,
                                          metadata={"doc": "critic (and GAN head) learning rate (default: lr)"})
    weight_decay: float = attrs.field(default=0.01, metadata={"doc": "AdamW weight decay of both optimizers"})
    dm_weight: float = attrs.field(default=1.0, metadata={"doc": "lambda_DM"})
    gan: Literal["auto", "on", "off"] = attrs.field(
        default="auto", metadata={"doc": "GAN head on the critic; auto: on when the run has real data"})
    gan_gen_weight: float = attrs.field(default=3e-3, metadata={"doc": "lambda_G (generator GAN weight)"})
    gan_disc_weight: float = attrs.field(default=1e-2, metadata={"doc": "lambda_D (critic GAN weight)"})
    regression_weight: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0)),
        metadata={"doc": "lambda_reg: DMD's regression loss ||G(x_in) - ODE_teacher(x_in)||^2 on the generator's "
                         "own inputs (default 1: it keeps every mode of a generator trained from scratch, and "
                         "breaks the per-class collapse of a 1-step teacher copy, which outputs the class mean "
                         "at sigma_max whatever the noise; 3 for a K-step generator from scratch, whose steps it "
                         "sharpens; 0, DMD2's choice, for teachers with expensive_calls such as the diffusers "
                         "pipelines)"})
    regression_warmup: int = attrs.field(
        default=0, validator=attrs.validators.ge(0),
        metadata={"doc": "iterations whose generator updates use the regression loss alone (the critic trains "
                         "throughout), then DM + GAN join: DMD2's 1-step warm start on teacher ODE pairs"})
    regression_solver: str = attrs.field(default="dpmpp-2m", metadata={"doc": "teacher ODE solver for the targets"})
    regression_steps: int = attrs.field(default=16, validator=positive,
                                        metadata={"doc": "teacher ODE steps from tau_k to 0 for the targets"})
    step_weighting: Literal["uniform", "edm"] = attrs.field(
        default="edm", metadata={"doc": "K-step regression weight of step k: EDM's lambda(tau_k)/lambda(tau_0), "
                                        "which gives every step the same gradient scale on the raw network, or "
                                        "uniform"})
    gan_feature_module: str | None = attrs.field(
        default=None, metadata={"doc": "critic module whose output feeds the GAN head (default: the teacher's "
                                       "gan_feature_module, or the MLP trunk's last norm)"})

    def __attrs_post_init__(self):
        if self.timesteps is not None and len(self.timesteps) != self.steps:
            raise ValueError(f"objective.timesteps has {len(self.timesteps)} entries but objective.steps={self.steps}")


# -- generator times (method note sec. 7) ------------------------------------------------------------------

def default_times(schedule, steps: int) -> list[float]:
    """tau_j, the first at the top. DMD2's evenly spaced times on schedules linear in t: t_max - j N/K on N-step
    discrete ones (SDXL's 999/749/499/249), ``t_from_fraction(1 - j/K)`` on flow and vp-cosine. EDM's rho-spacing
    puts the upper fractions at nearly pure noise (3/4 is sigma = 17.5, 25 sigma_data), where a step starts
    over rather than refines, so there the other K - 1 steps are evenly spaced in fraction from 1/2 down to 1/4
    (``core.timesteps.step_fraction``): sigma = 80, 2.5, 0.74, 0.17 for K = 4 (docs/methods/quality.md, eleventh
    pass)."""
    if schedule.name == "vp-discrete":
        n = int(round(schedule.t_max)) + 1
        return [float(schedule.t_max - j * (n // steps)) for j in range(steps)]
    return fraction_grid(schedule, steps, refine=True)[:-1].tolist()


def generator_times(config: DMD2Config, schedule) -> list[float]:
    if config.timesteps is None:
        return default_times(schedule, config.steps)
    times = [float(t) for t in config.timesteps]
    if any(a <= b for a, b in zip(times, times[1:])):
        raise UsageError(f"objective.timesteps must decrease strictly, got {times}")
    if not all(schedule.t_min <= t <= schedule.t_max for t in times):
        raise UsageError(f"objective.timesteps {times} leave the schedule's range "
                         f"[{schedule.t_min:g}, {schedule.t_max:g}]")
    return times


def backward_simulate(generator, noise: Tensor, times: list[float], k: int, cond=None) -> Tensor:
    """The generator's input at tau_k (method note sec. 7): start from noise at tau_0 and run the generator's own
    first k steps without gradients, re-noising each x0 estimate to the next time with fresh, independent noise.

    This is exactly the K-step sampler (``multistep``) stopped at tau_k, so training sees what sampling makes.
    """
    grid = torch.as_tensor(times[:k + 1], dtype=torch.float64)
    return multistep(generator, noise, grid, cond)


@torch.no_grad()
def backward_simulate_groups(generator, noise: Tensor, times: list[float], groups: list[tuple[int, slice]],
                             cond=None) -> Tensor:
    """Stratified backward simulation: the rows of group (k, rows) end at tau_k. One rollout for the batch: step j
    denoises the rows still behind (k > j) and re-noises their x0 to tau_{j+1}. Fresh noise is drawn for every row
    at every step, so the random stream does not depend on how the batch is split (DDP, gradient accumulation)."""
    sched = generator.schedule
    x = start(generator, noise, times[:1]).clone()
    for j in range(len(times) - 1):
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        behind = [rows for k, rows in groups if k > j]  # groups ascend in k: a suffix of the rows
        if behind:
            rows = slice(behind[0].start, behind[-1].stop)
            x0 = generator.denoise(x[rows], time_batch(times[j], x[rows]), condition_rows(cond, rows))
            s = torch.tensor(times[j + 1], dtype=torch.float64)
            x[rows] = ops.add_noise(x0, eps[rows], sched.alpha(s).to(x.dtype), sched.sigma(s).to(x.dtype))
    return x


def step_groups(K: int, total: int, offset: int, rows: int, iteration: int = 0) -> list[tuple[int, slice]]:
    """Stratified steps: the global batch's rows split into K contiguous groups as even as possible (the first
    total % K one row larger), group k at tau_k; returns this micro-batch's (k, local rows) for rows
    offset .. offset + rows. Placed by global row, so DDP and gradient accumulation train what one process would.
    A batch of fewer than K rows trains a different ``total`` of the steps each iteration, in turn."""
    if total >= K:
        bounds = [k * (total // K) + min(k, total % K) for k in range(K + 1)]
        steps = range(K)
    else:
        steps = sorted((iteration * total + i) % K for i in range(total))
        bounds = list(range(total + 1))
    groups = []
    for k, lo, hi in zip(steps, bounds, bounds[1:]):
        lo, hi = max(lo, offset), min(hi, offset + rows)
        if lo < hi:
            groups.append((k, slice(lo - offset, hi - offset)))
    return groups


def condition_rows(cond, rows: slice):
    """The condition of a slice of the batch's rows (conditions are per-row tensors: labels, prompt ids)."""
    if cond is None or torch.is_tensor(cond):
        return None if cond is None else cond[rows]
    raise UsageError(f"objective.step_sampling=stratified cannot split a {type(cond).__name__} condition into "
                     "row groups; use objective.step_sampling=iteration")


CRITIC_FROM_SCRATCH = 2  # critic updates per generator update from scratch (docs/methods/quality.md, ninth pass)


class DMD2:
    """DMD2: distribution matching with a fake-score critic (TTUR), GAN head, K-step backward simulation."""

    needs_critic = True

    def __init__(self, config: DMD2Config):
        self.config = config
        self.feature_module = None  # set by build() when the GAN head exists

    # -- set-up ----------------------------------------------------------------------------------------------
    def build(self, nets: dict) -> dict:
        teacher, student, critic = nets["teacher"], nets["student"], nets["critic"]
        for role, net in (("student", student), ("critic", critic)):
            if net.schedule.config() != teacher.schedule.config():
                raise UsageError(f"dmd2 needs the {role} on the teacher's noise schedule "
                                 f"({teacher.schedule.name}); got {net.schedule.name}")
        self.times = generator_times(self.config, teacher.schedule)
        self.from_scratch = bool(getattr(teacher, "analytic", False))  # no teacher network to start G from
        self.teacher_calls_expensive = bool(getattr(teacher, "expensive_calls", False))
        if self.config.gan == "off":
            return {}
        name = self._feature_module_name(teacher, critic)
        self.feature_module = gan.find_module(critic, name)
        shape = getattr(teacher, "gan_feature_shape", None) or self._probe_features(teacher, critic)
        return {"gan_head": gan.GANHead(tuple(shape))}

    def _feature_module_name(self, teacher, critic) -> str:
        name = self.config.gan_feature_module or getattr(teacher, "gan_feature_module", None)
        if name:
            return name
        if isinstance(getattr(critic, "backbone", None), ResidualMLP):
            return "backbone.out.0"  # the MLP trunk's final LayerNorm: the residual stream after the last block
        raise UsageError(f"dmd2's GAN head needs a critic module to read; {type(teacher).__name__} names none. "
                         "Set objective.gan_feature_module=NAME or objective.gan=off")

    @torch.no_grad()
    def _probe_features(self, teacher, critic) -> tuple[int, ...]:
        device = next(critic.parameters()).device
        x = torch.zeros(2, *teacher.data_shape, device=device)
        f = gan.critic_features(critic, self.feature_module, x, time_batch(teacher.schedule.t_max, x))
        return tuple(f.shape[1:])

    def phases(self) -> list[Phase]:
        c = self.config
        critic_nets = ("critic",) if c.gan == "off" else ("critic", "gan_head")
        lr = self.generator_lr
        return [Phase("generator", ("student",), every=self.critic_ratio, lr=lr, weight_decay=c.weight_decay),
                Phase("critic", critic_nets, lr=c.critic_lr or lr, weight_decay=c.weight_decay)]

    # defaults that depend on whether the generator starts from scratch (measured: docs/methods/quality.md)
    @property
    def generator_lr(self) -> float:
        if self.config.lr is not None:
            return self.config.lr
        return 1e-3 if getattr(self, "from_scratch", False) else 1e-4

    @property
    def critic_ratio(self) -> int:
        if self.config.critic_updates is not None:
            return self.config.critic_updates
        return CRITIC_FROM_SCRATCH if getattr(self, "from_scratch", False) else 5

    @property
    def stratified(self) -> bool:
        # measured on the mixtures from scratch (docs/methods/quality.md, ninth pass); a teacher copy keeps DMD2's
        # one k per iteration, whose rollout is one batched call per step on any per-device batch
        if self.config.step_sampling != "auto":
            return self.config.step_sampling == "stratified"
        return getattr(self, "from_scratch", False)

    @property
    def regression_weight(self) -> float:
        # on for teacher copies too (docs/methods/digits.md): DM and GAN gradients cannot make a copy's output
        # depend on the noise it starts from, the ODE targets can. Off, as in DMD2's recipe, where each of its
        # regression_steps teacher calls is a large pipeline's (SDXL: ~10x the iteration's cost). 3 for a K-step
        # generator from scratch: DM + GAN leave each step's x0 blurred around the modes, and a stronger pull to the
        # ODE targets sharpens them (docs/methods/quality.md, thirteenth pass)
        if self.config.regression_weight is not None:
            return self.config.regression_weight
        if getattr(self, "teacher_calls_expensive", False):
            return 0.0
        return 3.0 if self.config.steps > 1 and getattr(self, "from_scratch", False) else 1.0

    # -- one iteration -----------------------------------------------------------------------------------------
    def loss(self, phase: str, ctx) -> tuple[Tensor, dict]:
        if phase == "generator":
            return self.generator_loss(ctx)
        if phase == "critic":
            return self.critic_loss(ctx)
        raise ValueError(f"dmd2 has no phase '{phase}'")

    def generator_input(self, ctx) -> tuple[Tensor, Tensor]:
        """(x at tau_k, tau_k per row), shared by the generator and critic phases of the iteration. Rows come in
        groups (k, rows), cached as ``dmd2.groups``: one group with k drawn by torch's RNG (exact resume) and
        broadcast from rank 0, or with ``step_sampling=stratified`` one group per step."""
        if "dmd2.input" not in ctx.cache:
            K, teacher, cond = len(self.times), ctx.teacher, ctx.batch["cond"]
            # at the real batch's size where there is one (aspect-ratio buckets: each batch one size)
            shape = teacher.data_shape if ctx.batch["x"] is None else ctx.batch["x"].shape[1:]
            noise = torch.randn(ctx.batch_size, *shape, device=ctx.device)
            if self.stratified and K > 1:
                groups = step_groups(K, ctx.global_batch, ctx.row_offset, ctx.batch_size, ctx.iteration)
            else:
                k = distributed.broadcast_int(torch.randint(K, ())) if K > 1 else 0
                groups = [(k, slice(0, ctx.batch_size))]
            if self.stratified and K > 1 and self.config.backward_simulation:
                x_in = backward_simulate_groups(ctx.student, noise, self.times, groups, cond)
            else:
                parts = []
                for k, rows in groups:
                    z = noise[rows]
                    if k == 0 or self.config.backward_simulation:
                        sub = cond if len(groups) == 1 else condition_rows(cond, rows)
                        parts.append(backward_simulate(ctx.student, z, self.times, k, sub))
                    else:  # DMD2 without backward simulation: forward-noised real data (the train/test mismatch)
                        parts.append(self._noised_real(ctx, self.times[k], z, rows))
                x_in = parts[0] if len(parts) == 1 else torch.cat(parts)
            t_in = torch.cat([time_batch(self.times[k], x_in[rows]) for k, rows in groups])
            ctx.cache["dmd2.input"] = (x_in, t_in)
            ctx.cache["dmd2.groups"] = groups
        return ctx.cache["dmd2.input"]

    def _noised_real(self, ctx, t: float, noise: Tensor, rows: slice) -> Tensor:
        if ctx.batch["x"] is None:
            raise UsageError("objective.backward_simulation=false noises real data, but this run has none; "
                             "add data=... or keep backward simulation on")
        s = ctx.teacher.schedule
        t64 = torch.tensor(t, dtype=torch.float64)
        return ops.add_noise(ctx.batch["x"][rows], noise, s.alpha(t64).to(noise.dtype), s.sigma(t64).to(noise.dtype))

    def generate(self, ctx) -> Tensor:
        """x = G(x_{tau_k}, tau_k, c), the generator's x0 estimate (with grads when the student is training)."""
        x_in, t_in = self.generator_input(ctx)
        return ctx.student.denoise(x_in, t_in, ctx.batch["cond"])

    def use_gan(self, ctx) -> bool:
        if self.config.gan == "off":
            return False
        if ctx.batch["x"] is None:
            if self.config.gan == "on":
                raise UsageError("objective.gan=on needs real data, but this run has none; "
                                 "add data=... or set objective.gan=off")
            return False
        return True

    def generator_loss(self, ctx) -> tuple[Tensor, dict]:
        c = self.config
        x = self.generate(ctx)
        ctx.cache["dmd2.x"] = x.detach()
        if c.regression_warmup and ctx.iteration < c.regression_warmup:  # the warm start: the teacher's ODE pairs only
            reg = self.regression_loss(ctx, x)
            return reg, {"regression": reg.detach()}
        dm = self.distribution_matching_loss(x, ctx.batch["cond"], ctx.teacher, ctx.critic)
        loss, metrics = c.dm_weight * dm, {"dm": dm.detach()}
        if self.regression_weight:
            reg = self.regression_loss(ctx, x)
            loss = loss + self.regression_weight * reg
            metrics["regression"] = reg.detach()
        if self.use_gan(ctx):
            g = gan.generator_loss(*self.discriminate(ctx, [x], ctx.batch["cond"]))
            loss = loss + c.gan_gen_weight * g
            metrics["gan"] = g.detach()
        return loss, metrics

    def critic_loss(self, ctx) -> tuple[Tensor, dict]:
        c = self.config
        x = ctx.cache.get("dmd2.x")
        if x is None:
            with torch.no_grad():
                x = self.generate(ctx)
            ctx.cache["dmd2.x"] = x
        cond = ctx.batch["cond"]
        fake = self.fake_score_loss(x, cond, ctx.critic, ctx.teacher)
        loss, metrics = fake, {"fake": fake.detach()}
        if self.use_gan(ctx):
            logits_fake, logits_real = self.discriminate(ctx, [x, ctx.batch["x"].to(x.dtype)], cond)
            d = gan.discriminator_loss(logits_fake, logits_real)
            loss = loss + c.gan_disc_weight * d
            metrics["gan"] = d.detach()
        return loss, metrics

    # -- the losses ----------------------------------------------------------------------------------------------
    def distribution_matching_loss(self, x: Tensor, cond, teacher, critic) -> Tensor:
        """L_DM (method note sec. 4): noise x to x_t, t ~ U(t_from_fraction(dm_t_range)); x0_real from the teacher
        with CFG, x0_fake from the critic without; d L / d x = g / numel with
        g = (x0_fake - x0_real) / mean_{non-batch}|x - x0_real| (``ops.dmd_loss``, the MSE-to-detached-target form).
        """
        sched = teacher.schedule
        lo, hi = self.config.dm_t_range
        t = sched.t_from_fraction(lo + (hi - lo) * torch.rand(x.shape[0], dtype=torch.float64, device=x.device))
        guidance = self.config.guidance if self.config.guidance is not None else getattr(teacher, "guidance", None)
        with torch.no_grad():
            x_t = ops.add_noise(x.detach(), torch.randn_like(x), sched.alpha(t).to(x.dtype), sched.sigma(t).to(x.dtype))
            tt = time_batch(t, x_t)
            x0_real = teacher.denoise(x_t, tt, cond, guidance=guidance)
            x0_fake = critic.denoise(x_t, tt, cond)
        return ops.dmd_loss(x, x0_real, x0_fake)

    def step_weight(self, k: int, ctx) -> float:
        """Step k's regression weight: 1, or EDM's lambda(tau_k) / lambda(tau_0), lambda = 1/c_out^2, which gives
        every step's x0-MSE the same gradient scale on the raw network F (the last steps' c_out is small).
        From the step's index, not the time tensor: no device sync, and exactly 1 at k = 0."""
        if self.config.step_weighting == "uniform" or k == 0:
            return 1.0
        sched, sigma_data = ctx.teacher.schedule, sigma_data_of(ctx.student, ctx.teacher)

        def lam(t: float) -> float:
            t = torch.tensor(t, dtype=torch.float64)
            return float(edm_weight(sched.sigma(t) / sched.alpha(t), sigma_data))

        return lam(self.times[k]) / lam(self.times[0])

    def regression_loss(self, ctx, x: Tensor) -> Tensor:
        """DMD's regression loss (Yin et al. 2024a, eq. 9), on the generator's own input x_in at tau_k: the target
        is where the teacher's probability-flow ODE takes x_in (``regression_steps`` steps of
        ``regression_solver`` from tau_k to 0, with the real score's guidance; for step 0, whose input is pure
        noise, from t_max), so every noise keeps the mode the teacher assigns it. Computed per generator update,
        not from a stored pair set. The rows of step k are scaled by ``step_weight``; the loss is their weighted
        mean squared error over the whole batch."""
        x_in, _ = self.generator_input(ctx)
        c, teacher, cond = self.config, ctx.teacher, ctx.batch["cond"]
        sched = teacher.schedule
        solver = get_registry().get("sampler", c.regression_solver).factory
        guidance = c.guidance if c.guidance is not None else getattr(teacher, "guidance", None)
        extra = {} if guidance is None or cond is None else {"guidance": guidance}
        total, groups = x.new_zeros(()), ctx.cache["dmd2.groups"]
        for k, rows in groups:
            # step 0's input is pure noise sigma(tau_0) z whatever tau_0 is: its target is the teacher's full ODE
            # image of z, from t_max (DMD2's 1-step SDXL: ODE pairs from T, generator conditioned on t = 399)
            t_k = self.times[k]  # the step's time as a float: no device sync
            grid = make_grid(sched, c.regression_steps, t_max=None if k == 0 else t_k)
            with torch.no_grad():
                sigma_in = sched.sigma(torch.tensor(t_k, dtype=torch.float64))
                noise = x_in[rows] / sigma_in.to(x_in.dtype)  # the solvers start from sigma(grid[0]) * noise
                target = solver(teacher, noise, grid, cond if len(groups) == 1 else condition_rows(cond, rows), **extra)
            sse = (x[rows] - target.to(x.dtype)).square().sum()
            weight = self.step_weight(k, ctx)
            total = total + (sse if weight == 1 else weight * sse)
        return total / x.numel()

    def fake_score_loss(self, x: Tensor, cond, critic, teacher) -> Tensor:
        """L_fake (method note sec. 5): denoising loss of the critic on sg(x) over the full t range, with EDM's
        weighting lambda = 1/sigma_ve^2 + 1/sigma_d^2 (sigma_ve = sigma/alpha; eps-MSE plus an x0 term)."""
        sched = teacher.schedule
        x = x.detach()
        t = sched.t_from_fraction(torch.rand(x.shape[0], dtype=torch.float64, device=x.device))
        alpha, sigma = sched.alpha(t), sched.sigma(t)
        x_t = ops.add_noise(x, torch.randn_like(x), alpha.to(x.dtype), sigma.to(x.dtype))
        weight = edm_weight(sigma / alpha, sigma_data_of(critic, teacher))
        return ops.weighted_loss(critic.denoise(x_t, time_batch(t, x_t), cond), x, weight.to(x.dtype), "l2")

    def discriminate(self, ctx, xs: list[Tensor], cond) -> list[Tensor]:
        """h(F_features(x_t, t)) for each batch in ``xs`` (all with condition ``cond``): each noised at its own
        t ~ U(full range), the critic conditioned on t (Diffusion-GAN inputs); one critic pass when it can."""
        sched = ctx.teacher.schedule
        noised, times = [], []
        for x in xs:
            t = sched.t_from_fraction(torch.rand(x.shape[0], dtype=torch.float64, device=x.device))
            noised.append(ops.add_noise(x, torch.randn_like(x), sched.alpha(t).to(x.dtype), sched.sigma(t).to(x.dtype)))
            times.append(time_batch(t, x))
        head = ctx.nets["gan_head"]
        if len(xs) == 1 or not (cond is None or torch.is_tensor(cond)):  # conditions we cannot concatenate
            return [head(gan.critic_features(ctx.critic, self.feature_module, x_t, t, cond))
                    for x_t, t in zip(noised, times)]
        both = None if cond is None else torch.cat([cond] * len(xs))
        features = gan.critic_features(ctx.critic, self.feature_module, torch.cat(noised), torch.cat(times), both)
        return list(head(features).split([x.shape[0] for x in xs]))

    # -- sampling -----------------------------------------------------------------------------------------------
    def sampling(self, student) -> SamplingSpec:
        """K steps of the re-noising sampler on tau_0 .. tau_{K-1}, then the clean sentinel 0."""
        return SamplingSpec("multistep", [*generator_times(self.config, student.schedule), 0.0], {})

    def with_steps(self, spec: SamplingSpec, steps: int, student) -> SamplingSpec:
        """The trained times for the trained K; otherwise the default evenly spaced times for ``steps``."""
        if steps == len(spec.times) - 1:
            return spec
        return attrs.evolve(spec, times=[*default_times(student.schedule, steps), 0.0])


@hookimpl
def register_objectives(register):
    # the default demo (python -m core.run: dmd2 on ring8, 1 step) takes about a minute on 2 CPU cores;
    # the cosine decay settles the generator's last updates
    register("dmd2", DMD2, config=DMD2Config, default_critic="fake-score",
             train_defaults={"steps": 2000, "batch": 128, "lr_decay": "cosine", "eval_every": 1000,
                             "preview_every": 0, "ckpt_every": 1000, "log_every": 100})
