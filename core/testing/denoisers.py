"""Denoisers (teacher, student, critic): shapes, dtypes, per-row times; helpers shared by their checks."""

from __future__ import annotations

import contextlib

import torch

from core.parameterization import bcast
from core.schedules import NoiseSchedule

from ._report import _close, fail


def _times(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """n times spread over the schedule's range (u = 0.05..0.95 of t_from_fraction), float64."""
    u = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    return torch.as_tensor(schedule.t_from_fraction(u), dtype=torch.float64)


def _noised(schedule, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    eps = torch.randn_like(x0)
    return (bcast(schedule.alpha(t), x0) * x0 + bcast(schedule.sigma(t), x0) * eps).to(x0.dtype)


def _rows(cond, idx):
    return None if cond is None else cond[idx]


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training if isinstance(model, torch.nn.Module) else None
    if was is not None:
        model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


def check_denoiser(role: str, model, data_shape: tuple, x0: torch.Tensor, cond) -> torch.Tensor:
    """denoise(x_t, t, cond) for a [B] tensor of per-row times: shape, dtype, finite, rows independent."""
    if not isinstance(getattr(model, "schedule", None), NoiseSchedule):
        fail(f"{role}.schedule is {type(getattr(model, 'schedule', None)).__name__}, not a NoiseSchedule",
             "set .schedule to a core.schedules.NoiseSchedule (make_schedule('edm'), VPDiscreteSchedule(...))")
    if not callable(getattr(model, "denoise", None)):
        fail(f"{role} has no denoise method", "define denoise(x_t, t, cond=None) -> x0")
    sched = model.schedule
    n = x0.shape[0]
    t = _times(sched, n)
    x_t = _noised(sched, x0, t)
    tt = t.to(torch.float32)
    with torch.no_grad(), _eval_mode(model):
        out = model.denoise(x_t, tt, cond)
        if not torch.is_tensor(out) or tuple(out.shape) != tuple(x_t.shape):
            fail(f"{role}.denoise returned {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__} "
                 f"for x_t of shape {tuple(x_t.shape)}", "return an x0 estimate with x_t's shape")
        if out.dtype != x_t.dtype:
            fail(f"{role}.denoise returned {out.dtype} for {x_t.dtype} input",
                 "cast the result back to x_t.dtype (compute in float32 or wider inside if you need to)")
        if not torch.isfinite(out).all():
            fail(f"{role}.denoise returned non-finite values over t in [{float(t.min()):.4g}, {float(t.max()):.4g}]",
                 "make denoise finite over the schedule's whole [t_min, t_max]")
        flip = torch.arange(n - 1, -1, -1)
        back = model.denoise(x_t[flip], tt[flip], _rows(cond, flip))
        ok, diff = _close(back, out[flip], 1e-4)
        if not ok:
            fail(f"{role}.denoise of the batch in reverse order differs from the reversed output (max {diff:.3g})",
                 "treat t as one time per row (shape [B]) and make rows independent (no batch statistics, "
                 "no t[0] for the whole batch)")
    if tuple(x0.shape[1:]) != tuple(data_shape):
        fail(f"data rows have shape {tuple(x0.shape[1:])}, data_shape says {tuple(data_shape)}",
             "set data_shape to the shape of one sample in model space")
    return out


def _params(module) -> list:
    return list(module.parameters()) if isinstance(module, torch.nn.Module) else []


def _storages(module) -> set:
    return {p.untyped_storage().data_ptr() for p in _params(module)}


def _teacher_modules(teacher) -> dict:
    if isinstance(teacher, torch.nn.Module):
        return {"teacher": teacher}
    return {f"teacher.{k}": v for k, v in vars(teacher).items() if isinstance(v, torch.nn.Module)}
