"""Teacher: the Teacher protocol, and x0 consistent with its schedule."""

from __future__ import annotations

import math

import torch

from ._report import Report, _accepts, _close, fail
from ._setup import Setup
from .denoisers import _eval_mode, _noised, _rows, _storages, _teacher_modules, _times, check_denoiser


def _check_teacher_protocol(t) -> None:
    missing = [m for m in ("denoise", "encode_condition", "to_model_space", "to_data_space", "trainable_copy")
               if not callable(getattr(t, m, None))]
    if missing:
        fail(f"teacher lacks {', '.join(missing)}", "implement the Teacher protocol of core/protocols.py")
    shape = getattr(t, "data_shape", None)
    if not (isinstance(shape, tuple) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        fail(f"teacher.data_shape is {shape!r}", "set data_shape to a tuple of positive ints, e.g. (4, 64, 64)")
    nc = getattr(t, "num_classes", 0)
    if not isinstance(nc, int) or nc < 0:
        fail(f"teacher.num_classes is {nc!r}", "set num_classes to an int (0 when unconditional)")
    sig = _accepts(t.denoise, torch.zeros(1), torch.zeros(1), None, guidance=None)
    if sig:
        fail(f"teacher.denoise{sig[sig.index('('):]} does not take guidance=", "define denoise(x_t, t, cond=None, guidance=None)")
    if callable(getattr(t, "sample_exact", None)) and _accepts(t.sample_exact, 4, None):
        fail("teacher.sample_exact cannot be called as sample_exact(n, labels)",
             "define sample_exact(n, labels=None) (the runner's evaluation passes class labels)")


def _check_teacher_small_t(t, x0, cond) -> None:
    """At the least noisy time, x0 is x_t / alpha up to O(sigma / alpha): the output is x0, in the
    schedule's time units."""
    sched = t.schedule
    tmin = torch.full((x0.shape[0],), float(sched.t_min), dtype=torch.float64)
    x_t = _noised(sched, x0, tmin)
    a, s = float(sched.alpha(tmin[:1])), float(sched.sigma(tmin[:1]))
    with torch.no_grad():
        d = t.denoise(x_t, tmin.float(), cond)
    err = float((d.double() - x_t.double() / a).square().mean().sqrt())
    scale = float(x0.double().square().mean().sqrt())
    if err > 4 * s / a + 0.02 * scale:
        fail(f"at t=t_min={sched.t_min:.4g} (sigma/alpha={s / a:.3g}) denoise is {err:.3g} (rms) away from x_t/alpha",
             "return x0 (not eps, v or the score) and read t in the schedule's own units")


def _check_teacher_mmse(t, x0, cond) -> None:
    """E[x0 | x_t] is at least as good as the best linear (Wiener) estimator of the data, which already beats the
    trivial ones x_t/alpha and E[x0], and averages to E[x0] (Tweedie)."""
    sched = t.schedule
    x0d = x0.double()
    std = float(x0d.std())
    for k in (0.5, 1.0):
        lam = torch.tensor(-2 * math.log(k * std), dtype=torch.float64)
        tk = float(torch.as_tensor(sched.t_from_logsnr(lam)).clamp(sched.t_min, sched.t_max))
        tv = torch.full((x0.shape[0],), tk, dtype=torch.float64)
        x_t = _noised(sched, x0, tv)
        with torch.no_grad():
            d = t.denoise(x_t, tv.float(), cond).double()
        a = float(sched.alpha(tv[:1]))
        mse = float((d - x0d).square().mean())
        # per-dimension Wiener estimator m + a v / (a^2 v + s^2) (x_t - a m): the MMSE among linear maps, so the
        # posterior mean cannot lose to it (1.1: sampling noise of 256 rows); with k = 1 it halves the trivial mse
        m, v, s2 = x0d.mean(0), x0d.var(0), float(sched.sigma(tv[:1])) ** 2
        linear = m + a * v / (a * a * v + s2) * (x_t.double() - a * m)
        best_linear = float((linear - x0d).square().mean())
        if mse > 1.1 * best_linear:
            fail(f"at t={tk:.4g} (noise {k} x data std) denoise has mse {mse:.4g}, worse than the best linear "
                 f"estimator of the data ({best_linear:.4g})", "return E[x0 | x_t] with t in the schedule's own "
                 "units (check the parameterisation conversion and the time passed to the network)")
        bias = (d - x0d).mean(0).abs().max()
        se = float((d - x0d).std(0).max()) / math.sqrt(x0.shape[0])
        if bias > 5 * se + 0.05 * std:
            fail(f"at t={tk:.4g} the mean of denoise over noised data is off the data mean by {float(bias):.3g}",
                 "E[denoise(x_t)] must equal E[x0] (Tweedie); look for a missing offset or scale")


def _check_teacher_guidance(t, x0, cond) -> None:
    sched = t.schedule
    tv = torch.full((x0.shape[0],), float(_times(sched, 3)[1]), dtype=torch.float64)
    x_t = _noised(sched, x0, tv)
    with torch.no_grad():
        plain = t.denoise(x_t, tv.float(), cond)
        one = t.denoise(x_t, tv.float(), cond, guidance=1.0)
        none = t.denoise(x_t, tv.float(), cond, guidance=None)
        three = t.denoise(x_t, tv.float(), cond, guidance=3.0)
    for what, out in (("guidance=1", one), ("guidance=None", none)):
        ok, diff = _close(out, plain)
        if not ok:
            fail(f"{what} changes the conditional denoise (max {diff:.3g})", "scale 1 (or None) means no guidance")
    if _close(three, plain, 1e-6)[0]:
        fail("guidance=3 gives the same x0 as no guidance", "apply classifier-free guidance with the given scale")
    # the exact formula (Ho & Salimans 2022), from two separate calls: x0_u + w (x0_c - x0_u), with cond=None the
    # unconditional model; it is linear, so guiding eps / v / flow outputs before converting gives the same x0
    with torch.no_grad():
        uncond = t.denoise(x_t, tv.float(), None)
    want = uncond.double() + 3.0 * (plain.double() - uncond.double())
    ok, diff = _close(three, want, 1e-3)
    if not ok:
        fail(f"guidance=3 is {diff:.3g} (max) away from x0_u + 3 (x0_c - x0_u) of the separate conditional and "
             "unconditional calls", "combine as uncond + w * (cond - uncond), with cond=None as the unconditional "
             "input (not cond + w * (cond - uncond), and not the scale applied to x_t)")


def _check_trainable_copy(t, x0, cond) -> None:
    net = t.trainable_copy()
    if net is None:
        return
    if not isinstance(net, torch.nn.Module) or not callable(getattr(net, "denoise", None)):
        fail(f"trainable_copy returned {type(net).__name__}", "return a torch.nn.Module with denoise() (or None)")
    if not any(p.requires_grad for p in net.parameters()):
        fail("trainable_copy has no parameter that requires grad", "return the copy with requires_grad_(True)")
    shared = _storages(net) & set().union(*[_storages(m) for m in _teacher_modules(t).values()])
    if shared:
        fail("trainable_copy shares parameter storage with the teacher", "deep-copy the network (copy.deepcopy)")
    sched = t.schedule
    tv = _times(sched, x0.shape[0])
    x_t = _noised(sched, x0, tv)
    with torch.no_grad(), _eval_mode(net):
        ok, diff = _close(net.denoise(x_t, tv.float(), cond), t.denoise(x_t, tv.float(), cond), 1e-3)
    if not ok:
        fail(f"trainable_copy's denoise differs from the teacher's (max {diff:.3g})",
             "initialise the copy from the teacher's weights, on the same schedule")


def check_teacher(setup: Setup, rep: Report) -> None:
    t = setup.teacher
    if rep.run("protocol", _check_teacher_protocol, t) is Report.FAILED:
        return
    x0, cond, exact = setup.batch(256)
    if x0 is None:
        x0 = torch.randn(256, *t.data_shape, device=setup.device) * float(getattr(t, "sigma_data", 0.5))
    if cond is None and getattr(t, "num_classes", 0):
        cond = t.encode_condition(torch.arange(256) % t.num_classes)

    def outputs():
        out = check_denoiser("teacher", t, t.data_shape, x0, cond)
        if out.requires_grad:
            fail("teacher.denoise output requires grad", "freeze the teacher (requires_grad_(False)) or run under no_grad")
        back = t.to_data_space(t.to_model_space(t.to_data_space(x0[:4])))
        if tuple(back.shape) != tuple(t.to_data_space(x0[:4]).shape):
            fail("to_data_space(to_model_space(x)) changes the shape", "make the two maps inverse in shape")

    rep.run("denoise shapes", outputs)
    rep.run("x0 at small t", _check_teacher_small_t, t, x0, cond)
    if exact:
        rep.run("x0 vs data (MMSE, Tweedie)", _check_teacher_mmse, t, x0, cond)
    if cond is not None:  # class labels or prompts: classifier-free guidance applies
        rep.run("guidance", _check_teacher_guidance, t, x0, cond)
    rep.run("trainable_copy", _check_trainable_copy, t, x0[:32], _rows(cond, slice(0, 32)))
