"""Generating samples: ``generate`` runs a ``SamplingSpec`` (a sampler plugin, its grid and options) in batches;
``one_call_per_step`` is the loop of samplers that call the model once per step, and ``multistep`` the few-step
generators' re-noising sampler (DMD2's backward simulation and sampling, consistency models). Samplers share one
signature (core.protocols.Sampler): ``fn(model, noise, times, cond=None, *, return_trajectory=False, ...)``.
The command line over this is ``python -m core.sample`` (core/sample.py)."""

from __future__ import annotations

import torch

from core import ops
from core.protocols import SamplingSpec, time_batch
from core.registry import get_registry


def denoise_at(model, x, t, cond, guidance):
    """model.denoise at one scalar time for the whole batch (guidance passed only when set, since students
    and critics take no guidance argument)."""
    tt = time_batch(float(t), x)
    if guidance is not None:
        return model.denoise(x, tt, cond, guidance=guidance)
    return model.denoise(x, tt, cond)


def start(model, noise, times):
    """x at times[0]: sigma(t0) * noise (the data term alpha x0 is neglected at the top of the grid)."""
    return noise * model.schedule.sigma(torch.as_tensor(times[0], dtype=torch.float64)).to(noise.dtype)


def one_call_per_step(model, noise, times, cond, step, *, return_trajectory=False, guidance=None, callback=None):
    """The loop shared by samplers that call the model once per step: x0 = model(x, t), then
    ``x = step(x, x0, t, s)`` with float64 scalar times; a final time of 0 returns x0."""
    x = start(model, noise, times)
    traj = [x]
    for i in range(len(times) - 1):
        t, s = float(times[i]), float(times[i + 1])
        x0 = denoise_at(model, x, t, cond, guidance)
        x = x0 if s == 0 else step(x, x0, torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": x0})
        traj.append(x)
    return (x, traj) if return_trajectory else x


@torch.no_grad()
def multistep(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None,
              generator=None):
    """Few-step generator sampling (DMD2, consistency models): denoise at t_i, then re-noise the
    estimate to t_{i+1} with fresh Gaussian noise. A final time of 0 returns x0."""
    sched = model.schedule

    def step(x, x0, t, s):
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return ops.add_noise(x0, eps, sched.alpha(s).to(x.dtype), sched.sigma(s).to(x.dtype))

    return one_call_per_step(model, noise, times, cond, step, return_trajectory=return_trajectory,
                             guidance=guidance, callback=callback)


@torch.no_grad()
def generate(model, spec: SamplingSpec, n: int, cond=None, registry=None, device="cpu", batch: int = 4096,
             shape=None, **overrides):
    """``n`` samples in model space from ``model`` with the sampler and grid of ``spec``."""
    registry = registry or get_registry()
    fn = registry.get("sampler", spec.sampler).factory
    times = torch.as_tensor(spec.times, dtype=torch.float64)
    options = {**spec.options, **overrides}
    shape = tuple(shape or model.data_shape)
    outs = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        noise = torch.randn(m, *shape, device=device)
        c = None if cond is None else cond[start:start + m]
        outs.append(fn(model, noise, times, c, **options))
    return torch.cat(outs)
