"""``train.compile=true``: ``torch.compile`` on a run's networks, for the host-bound iteration (issue 15: an SDXL
DMD2 iteration spends 2.06 s of CPU time issuing 254k aten calls against 0.69 s on the GPU, docs/benchmarks.md).

Each network's *inner* module (``net`` of a diffusers denoiser, ``backbone`` of ``core.networks.DenoiserNet``,
else the module itself) is compiled in place with ``nn.Module.compile`` (``regional``: only its repeated
blocks): its ``__call__`` goes through dynamo, while parameters, ``state_dict`` keys and checkpoints stay as
they are. The denoiser wrappers (preconditioning, guidance, parameterisation) stay eager: they are a few
element-wise ops and are called as methods (``denoise``), which ``nn.Module.compile`` does not reach. A
network shared by several roles (the ``shared-lora`` base) is compiled once; peft's adapter switch is a guard
change, so each role compiles once.
"""

from __future__ import annotations

import torch
from torch import nn

from core import hookimpl


def inner_module(network) -> nn.Module | None:
    """The module a role's denoiser calls: ``net`` (diffusers), ``backbone`` (DenoiserNet), else itself."""
    network = getattr(network, "denoiser", network)  # a teacher object holding its network (diffusers teachers)
    for name in ("net", "backbone"):
        inner = getattr(network, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return network if isinstance(network, nn.Module) else None


def compile_networks(nets: dict, mode: str = "default") -> list[str]:
    """Compile every role's inner module once, in place; returns the roles compiled."""
    done, compiled = set(), []
    for role, network in nets.items():
        inner = inner_module(network)
        if inner is None or id(inner) in done:
            continue
        compile_module(inner, mode)
        done.add(id(inner))
        compiled.append(role)
    return compiled


def compile_module(module: nn.Module, mode: str) -> None:
    """``mode="regional"``: only the model's repeated blocks (diffusers' ``compile_repeated_blocks``: SDXL's 70
    transformer blocks share a few compiled graphs), else the whole module; other modes are torch.compile's.
    On an H100 the regional shared-lora SDXL iteration ran 1.49x eager after 62 s of compiling
    (docs/benchmarks.md). Roles and batch sizes are dynamo guards, so the recompile limit is raised."""
    if mode == "regional":
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if getattr(module, "_repeated_blocks", None) and hasattr(module, "compile_repeated_blocks"):
            module.compile_repeated_blocks()
            return
        mode = "default"  # nothing repeated to compile alone (e.g. the MLP): the whole module
    module.compile(mode=mode)


class Compile:
    """Built-in with ``train.compile=true``: compiles the run's networks before its first iteration."""

    def __init__(self, mode: str, log):
        self.mode, self.log = mode, log

    @hookimpl
    def fewstep_run_start(self, trainer, start):
        roles = compile_networks(trainer.nets, self.mode)
        self.log(f"fewstep: torch.compile (mode {self.mode}) on {', '.join(roles) or 'no network'}; "
                 "the first iterations compile")
