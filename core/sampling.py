"""Generate with a trained student or a teacher: the sampler plugin, a time grid and options."""

from __future__ import annotations

import torch

from core.protocols import SamplingSpec
from core.registry import get_registry


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
