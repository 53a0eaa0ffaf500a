"""Samplers: the k-diffusion-style signature, behaviour on exact Gaussian and point-mass denoisers."""

from __future__ import annotations

import inspect

import attrs
import torch

from core.parameterization import bcast
from core.schedules import NoiseSchedule, make_schedule

from ._report import Report, _accepts, fail
from ._setup import Setup


SAMPLER_SIGNATURE = "fn(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None, **options)"


class GaussianDenoiser:
    """Exact E[x0 | x_t] for x0 ~ N(mean, std^2 I) on any schedule:
    mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mean). Records its calls. Takes no
    ``guidance`` (like a student), so a sampler must not pass one unless asked."""

    def __init__(self, schedule: NoiseSchedule, mean: float = 0.3, std: float = 0.5, dim: int = 2):
        self.schedule, self.mean, self.std, self.data_shape = schedule, mean, std, (dim,)
        self.calls: list[dict] = []

    def denoise(self, x_t, t, cond=None):
        self.calls.append({"t": t, "cond": cond, "rows": x_t.shape[0]})
        if not (torch.is_tensor(t) and tuple(t.shape) == (x_t.shape[0],)):
            fail(f"the sampler called denoise with t = {t!r:.60}", "pass t as a [B] tensor (one time per row)")
        t64 = t.double()
        a, s = bcast(self.schedule.alpha(t64), x_t).double(), bcast(self.schedule.sigma(t64), x_t).double()
        v = self.std**2
        x0 = self.mean + a * v / (a * a * v + s * s) * (x_t.double() - a * self.mean)
        return x0.to(x_t.dtype)


class GuidedGaussianDenoiser(GaussianDenoiser):
    """The same, taking ``guidance`` like a teacher (and recording it)."""

    def denoise(self, x_t, t, cond=None, guidance=None):
        self.calls.append({"guidance": guidance})
        return super().denoise(x_t, t, cond)


class PointMassDenoiser:
    """Data = one point c: E[x0 | x_t] = c at every t. A grid ending in 0.0 must return exactly c."""

    def __init__(self, schedule, c):
        self.schedule, self.c = schedule, c

    def denoise(self, x_t, t, cond=None):
        return self.c.expand_as(x_t).to(x_t.dtype)


def _sampler_options(setup: Setup) -> dict:
    config = setup.config_of("sampler")
    return attrs.asdict(config) if config is not None else {}


def check_sampler(setup: Setup, rep: Report) -> None:
    fn, name, opts = setup.info.factory, setup.name, _sampler_options(setup)
    edm = make_schedule("edm")
    from core.timesteps import make_grid

    def signature():
        sig = _accepts(fn, None, None, None, None, return_trajectory=True, guidance=None, callback=None, **opts)
        if sig:
            fail(f"sampler '{name}' has signature {sig}",
                 f"use {SAMPLER_SIGNATURE}; every field of its config must be a keyword option")

    if rep.run("signature", signature) is Report.FAILED:
        return

    def shapes():
        model = GaussianDenoiser(edm)
        times = make_grid(edm, 6)
        noise = torch.randn(32, 2)
        seen = []
        out = fn(model, noise, times, None, return_trajectory=True, callback=seen.append, **opts)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple))):
            fail("return_trajectory=True did not return (x, [x_0, x_1, ...])", "return (x, trajectory list)")
        x, traj = out
        if tuple(x.shape) != tuple(noise.shape) or x.dtype != noise.dtype:
            fail(f"sampler returned {tuple(x.shape)} {x.dtype} for noise {tuple(noise.shape)} {noise.dtype}",
                 "return samples with the noise's shape and dtype")
        if not torch.isfinite(x).all():
            fail("sampler returned non-finite samples", "check the update at the first and last times")
        if len(traj) != len(times) or not torch.equal(traj[-1], x):
            fail(f"trajectory has {len(traj)} entries for {len(times)} times (or does not end with the output)",
                 "record the start and the state after each step; the last entry is the output")
        if len(seen) != len(times) - 1 or not all({"x", "i", "t", "denoised"} <= set(s) for s in seen):
            fail(f"callback saw {len(seen)} calls for {len(times) - 1} steps (each needs x, i, t, denoised)",
                 "call callback({'x', 'i', 't', 'denoised'}) once per step")
        if x.requires_grad:
            fail("sampler output requires grad", "decorate the sampler with @torch.no_grad()")
        # conditions and guidance reach the model; no guidance is passed when none is asked for
        cond = torch.arange(32) % 3
        guided = GuidedGaussianDenoiser(edm)
        fn(guided, noise, times, cond, guidance=2.5, **opts)
        if not guided.calls or any(c.get("guidance", 2.5) != 2.5 for c in guided.calls):
            fail("guidance=2.5 did not reach model.denoise", "pass guidance=... to model.denoise when it is not None")
        if any(c.get("cond") is not None and not torch.equal(c["cond"], cond) for c in guided.calls) or \
                all(c.get("cond") is None for c in guided.calls):
            fail("cond did not reach model.denoise unchanged", "pass cond through to model.denoise")
        if any(not torch.isfinite(c["t"]).all() or (c["t"] <= 0).any() for c in model.calls):
            fail("the sampler called denoise at t <= 0", "return the last x0 at the final time 0.0 instead of calling denoise there")

    def point_mass():
        c = torch.tensor([0.7, -1.3])
        for kind in ("edm", "vp-cosine"):
            sched = make_schedule(kind)
            out = fn(PointMassDenoiser(sched, c), torch.randn(16, 2), make_grid(sched, 4), None, **opts)
            if not torch.allclose(out, c.expand_as(out), atol=1e-5):
                fail(f"on a {kind} grid ending in 0.0 with data = one point, the output is not that point "
                     f"(max error {float((out - c).abs().max()):.3g})", "a final time of 0.0 returns the last denoised x0")

    def distribution():
        # every sampler: the mean of N(mean, std^2) data to within 4 standard errors, and a spread within a
        # factor 1.5 (few-step generator samplers expect a generator, not a posterior mean, so their spread
        # differs: multistep gives 0.62 std, ancestral 0.8 at 32 steps)
        for kind in ("edm", "vp-cosine", "flow"):
            sched = make_schedule(kind)
            model = GaussianDenoiser(sched)
            torch.manual_seed(0)
            x = fn(model, torch.randn(4000, 2), make_grid(sched, 32), None, **opts).double()
            mean, std = float(x.mean()), float(x.std())
            if abs(mean - model.mean) > 0.02 or not 0.5 < std / model.std < 1.5:
                fail(f"with the exact denoiser of N({model.mean}, {model.std}^2) on {kind}, 32 steps give mean "
                     f"{mean:.3f} and std {std:.3f}", "start from x = sigma(times[0]) * noise and follow the "
                     "schedule's alpha and sigma at each step")

    def pf_ode():
        """A deterministic sampler solves the probability-flow ODE: for Gaussian data its solution is closed-form,
        y(s) = mean + (y0 - mean) sqrt((std^2 + s^2) / (std^2 + s0^2)) in y = x/alpha, s = sigma/alpha, and the
        error must fall at least like a first-order method's as the steps double (measured: Euler 0.04-0.07 of the
        std at 64 steps, ratio 0.5; 2nd/3rd order 0.001-0.01, ratio 0.08-0.23)."""
        z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
        for kind in ("edm", "vp-cosine", "flow"):
            sched = make_schedule(kind)
            model = GaussianDenoiser(sched)
            errs = []
            for steps in (32, 64):
                times = make_grid(sched, steps)
                torch.manual_seed(1)
                first = fn(model, z, times, None, **opts)
                torch.manual_seed(2)
                if not torch.equal(first, fn(model, z, times, None, **opts)):
                    return  # a stochastic sampler: no single ODE solution to compare with
                t0 = times[:1].double()
                s0 = float(sched.sigma(t0) / sched.alpha(t0))
                y0 = s0 * z.double()  # x = sigma_0 noise
                exact = model.mean + (y0 - model.mean) * model.std / (model.std**2 + s0**2) ** 0.5
                errs.append(float((first.double() - exact).square().mean().sqrt()) / model.std)
            if errs[1] > 0.1 or errs[1] > 0.6 * errs[0]:
                fail(f"deterministic, but on {kind} with the exact denoiser of N({model.mean}, {model.std}^2) its rms "
                     f"error against the closed-form probability-flow ODE solution is {errs[0]:.3g} (32 steps) and "
                     f"{errs[1]:.3g} (64 steps) of the std", "solve dx/dt of the probability-flow ODE: x_s = alpha_s "
                     "x0 + sigma_s (x_t - alpha_t x0) / sigma_t is the first-order (DDIM) step")

    def determinism():
        sched = make_schedule("vp-cosine")
        noise, times = torch.randn(64, 2), make_grid(sched, 5)
        runs = []
        for _ in range(2):
            torch.manual_seed(3)
            runs.append(fn(GaussianDenoiser(sched), noise, times, None, **opts))
        if not torch.equal(runs[0], runs[1]):
            fail("two runs under the same torch.manual_seed differ", "draw all noise from torch's RNG "
                 "(torch.randn / randn_like, or the generator= you are given)")
        if "generator" in inspect.signature(fn).parameters:
            outs = [fn(GaussianDenoiser(sched), noise, times, None, generator=torch.Generator().manual_seed(5), **opts)
                    for _ in range(2)]
            if not torch.equal(outs[0], outs[1]):
                fail("two runs with the same generator= differ", "draw every random number from generator")

    rep.run("shapes and arguments", shapes)
    rep.run("point-mass data", point_mass)
    rep.run("exact Gaussian data", distribution)
    rep.run("probability-flow ODE (deterministic samplers)", pf_ode)
    rep.run("deterministic under a seed", determinism)
