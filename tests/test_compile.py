"""``train.compile=true`` (core.compiling): one training step of a compiled network gives the loss and the
gradients of the eager one (inductor's fused kernels reorder float sums: a tolerance, not bit equality), the
checkpoint keys do not change, and the run option compiles the run's networks."""

from __future__ import annotations

import shutil

import pytest
import torch

from core.compiling import compile_networks, inner_module

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="torch.compile on CPU needs a C compiler")


def mlp_denoiser():
    from core.networks import DenoiserNet, ResidualMLP
    from core.schedules import make_schedule

    torch.manual_seed(0)
    return DenoiserNet(ResidualMLP(2, 32, 1, 16, 0), make_schedule("edm"), "edm", 0.5)


def one_step(net, x, t, target):
    loss = (net.denoise(x, t) - target).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def test_compiled_step_matches_eager_and_keeps_the_state_dict():
    eager, compiled = mlp_denoiser(), mlp_denoiser()
    keys = list(compiled.state_dict())
    assert compile_networks({"student": compiled, "same": compiled}) == ["student"]  # a shared network once
    assert inner_module(compiled) is compiled.backbone and list(compiled.state_dict()) == keys
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    t = torch.rand(64, generator=g) * 10 + 0.01
    loss_e, grads_e = one_step(eager, x, t, target)
    loss_c, grads_c = one_step(compiled, x, t, target)
    assert torch.allclose(loss_c, loss_e, rtol=1e-5)
    for name, ge in grads_e.items():
        assert torch.allclose(grads_c[name], ge, rtol=1e-4, atol=1e-6 * float(ge.abs().max())), name
    assert compiled.backbone._compiled_call_impl is not None and eager.backbone._compiled_call_impl is None
