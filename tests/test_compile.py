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


def test_regional_compiles_only_the_repeated_blocks_and_falls_back_to_the_whole_module():
    """train.compile_mode=regional: a diffusers UNet gets its transformer blocks compiled (diffusers'
    ``_repeated_blocks``), not itself; a network with no repeated blocks is compiled whole."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention import BasicTransformerBlock

    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8)
    mlp = mlp_denoiser()
    assert compile_networks({"teacher": unet, "student": mlp}, "regional") == ["teacher", "student"]
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == 4 and all(b._compiled_call_impl is not None for b in blocks)
    compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == blocks  # the UNet and its other modules stay eager
    assert mlp.backbone._compiled_call_impl is not None
    assert torch._dynamo.config.recompile_limit >= 64
