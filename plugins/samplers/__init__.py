"""Sampler plugins: plain functions ``fn(model, noise, times, cond=None, *, return_trajectory=False,
**options)``; see ``core.protocols.Sampler``."""

from core import hookimpl
from core.generation import multistep
from plugins.samplers.basic import euler


@hookimpl
def register_samplers(register):
    register("euler", euler)
    register("ddim", euler)
    register("multistep", multistep)
