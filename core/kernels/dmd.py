"""DMD2's distribution-matching gradient and loss, fused into two passes (Yin et al. 2024, eq. 8 as in their code).

    N_b = mean_{non-batch} |x_b - x0_real,b|              pass 1: per-chunk partial sums of |x - x0_real|
    g   = nan_to_num((x0_fake - x0_real) / N_b, 0)        pass 2: g, and per-chunk partial sums of g^2
    L   = 0.5 mean(g^2), with dL/dx = g / x.numel()       (the backward hands back g directly)

The eager form (abs, mean, divide, nan_to_num, an MSE against a detached target, and its autograd)
reads and writes full-size tensors about ten times; here it is read x, x0_real, then x0_real, x0_fake and
write g. The partial sums make the reduction deterministic (no atomics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.kernels._triton import NUM_WARPS, chunking, eager_autograd, flat, rows, tl, triton
from core.parameterization import bcast

# --------------------------------------------------------------------------- torch reference


def dmd_gradient_reference(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """In float64 as the reference code converts, cast back to x's dtype."""
    x64, real64 = x.detach().double(), x0_real.detach().double()
    norm = (x64 - real64).abs().flatten(1).mean(1)
    g = (x0_fake.detach().double() - real64) / bcast(norm, x64)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).to(x.dtype)


def dmd_loss_reference(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """An MSE against a detached target injects the chosen gradient g / x.numel()."""
    g = dmd_gradient_reference(x, x0_real, x0_fake)
    return 0.5 * torch.nn.functional.mse_loss(x, (x - g).detach(), reduction="mean")


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _dmd_norm_kernel(x_ptr, real_ptr, partial_ptr, D, C, CHUNK, BLOCK: tl.constexpr):
    """Pass 1, program (chunk c, sample b): sum of |x - x0_real| over the chunk."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK):
        cols = c * CHUNK + start + tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(x_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(real_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc += tl.abs(x - r)
    tl.store(partial_ptr + b * C + c, tl.sum(acc, axis=0))


@triton.jit
def _dmd_grad_kernel(real_ptr, fake_ptr, partial_ptr, g_ptr, sq_ptr, D, C, CHUNK,
                     BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
    """Pass 2, program (c, b): N_b from all partials of sample b, then g over the chunk and sum g^2."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    parts = tl.load(partial_ptr + b * C + tl.arange(0, C_BLOCK), mask=tl.arange(0, C_BLOCK) < C, other=0.0)
    norm = tl.sum(parts, axis=0) / D
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK):
        cols = c * CHUNK + start + tl.arange(0, BLOCK)
        mask = cols < D
        r = tl.load(real_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(fake_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        g = (f - r) / norm
        g = tl.where((g == g) & (tl.abs(g) < float("inf")), g, 0.0)  # NaN guard: non-finite -> 0
        g = tl.where(mask, g, 0.0)
        tl.store(g_ptr + b * D + cols, g.to(g_ptr.dtype.element_ty), mask=mask)
        acc += g * g
    tl.store(sq_ptr + b * C + c, tl.sum(acc, axis=0))


# --------------------------------------------------------------------------- launcher


def launch(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
    """(g in x's dtype, the loss 0.5 mean(g^2) as a 0-d tensor in x's dtype)."""
    x, real, fake = flat(x), flat(x0_real), flat(x0_fake)
    b, d = rows(x)
    c, chunk, block = chunking(d)
    partial = torch.empty(b * c, dtype=torch.float32, device=x.device)
    sq = torch.empty(b * c, dtype=torch.float32, device=x.device)
    g = torch.empty_like(x)
    _dmd_norm_kernel[(c, b)](x, real, partial, d, c, chunk, BLOCK=block, num_warps=NUM_WARPS)
    _dmd_grad_kernel[(c, b)](real, fake, partial, g, sq, d, c, chunk, BLOCK=block,
                             C_BLOCK=triton.next_power_of_2(c), num_warps=NUM_WARPS)
    loss = (sq.sum() * (0.5 / x.numel())).to(x.dtype)
    return g, loss


# --------------------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("fewstep::dmd_gradient_loss", mutates_args=())
def dmd_gradient_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
    return launch(x, x0_real, x0_fake)


@dmd_gradient_loss.register_fake
def _(x, x0_real, x0_fake):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(())


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[0])
    ctx.mark_non_differentiable(output[0])  # g is a fixed direction, as sg(.) in the reference
    ctx.numel = inputs[0].numel()


def _backward(ctx, _grad_g, grad_loss):
    (g,) = ctx.saved_tensors
    return (g * (grad_loss.float() / ctx.numel)).to(g.dtype), None, None


dmd_gradient_loss.register_autograd(_backward, setup_context=_setup)
DmdGradientLoss = eager_autograd("DmdGradientLoss", launch, _setup, _backward)
