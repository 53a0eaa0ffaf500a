"""DMD2's distribution-matching gradient and loss, fused into two passes (Yin et al. 2024, eq. 8 as in their code).

    N_b = mean_{non-batch} |x_b - x0_real,b|              pass 1: per-chunk partial sums of |x - x0_real|
                                                          (the shared ``reduction.partial_sums``)
    g   = nan_to_num((x0_fake - x0_real) / N_b, 0)        pass 2: g, and per-chunk partial sums of g^2
    L   = 0.5 mean(g^2), with dL/dx = g / x.numel()       (the backward hands back g directly)

The eager form (abs, mean, divide, nan_to_num, an MSE against a detached target, and its autograd)
reads and writes full-size tensors about ten times; here it is read x, x0_real, then x0_real, x0_fake and
write g. The partial sums make the reduction deterministic (no atomics). g and L are kept in fp32 whatever
the input dtype: with fp16 inputs, g = (x0_fake - x0_real) / N_b exceeds fp16's range (65504) as soon as
x is close to x0_real, and L = 0.5 mean(g^2) already at |g| ~ 360; the gradient handed to x is g / x.numel(),
formed in fp32 and only then cast to x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.kernels import reduction
from core.kernels._triton import NUM_WARPS, KernelOp, chunking, flat, rows, tl, triton
from core.parameterization import bcast

# --------------------------------------------------------------------------- torch reference


def _result_dtype(x: Tensor) -> torch.dtype:
    """g and the loss: x's dtype, at least float32 (normalised in fp32, so fp16 inputs cannot overflow)."""
    return torch.promote_types(x.dtype, torch.float32)


def dmd_gradient_reference(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """In float64 as the reference code converts, cast to x's dtype (at least float32)."""
    x64, real64 = x.detach().double(), x0_real.detach().double()
    norm = (x64 - real64).abs().flatten(1).mean(1)
    g = (x0_fake.detach().double() - real64) / bcast(norm, x64)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).to(_result_dtype(x))


def dmd_loss_reference(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """An MSE against a detached target injects the chosen gradient g / x.numel() (in fp32 at least)."""
    g = dmd_gradient_reference(x, x0_real, x0_fake)
    x = x.to(g.dtype)
    return 0.5 * torch.nn.functional.mse_loss(x, (x - g).detach(), reduction="mean")


# --------------------------------------------------------------------------- Triton kernels


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
    """(g, the loss 0.5 mean(g^2) as a 0-d tensor), both in x's dtype promoted to at least fp32."""
    x, real, fake = flat(x), flat(x0_real), flat(x0_fake)
    b, d = rows(x)
    c, chunk, block = chunking(d)
    partial = reduction.partial_sums("abs", x, real)
    sq = torch.empty(b * c, dtype=torch.float32, device=x.device)
    g = torch.empty(x.shape, dtype=_result_dtype(x), device=x.device)
    _dmd_grad_kernel[(c, b)](real, fake, partial, g, sq, d, c, chunk, BLOCK=block,
                             C_BLOCK=triton.next_power_of_2(c), num_warps=NUM_WARPS)
    loss = (sq.sum() * (0.5 / x.numel())).to(g.dtype)
    return g, loss


# --------------------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("fewstep::dmd_gradient_loss", mutates_args=())
def dmd_gradient_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
    return launch(x, x0_real, x0_fake)


@dmd_gradient_loss.register_fake
def _(x, x0_real, x0_fake):
    return x.new_empty(x.shape, dtype=_result_dtype(x)), x.new_empty((), dtype=_result_dtype(x))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[0])
    ctx.mark_non_differentiable(output[0])  # g is a fixed direction, as sg(.) in the reference
    ctx.numel, ctx.x_dtype = inputs[0].numel(), inputs[0].dtype


def _backward(ctx, _grad_g, grad_loss):
    (g,) = ctx.saved_tensors
    return (g * (grad_loss.float() / ctx.numel)).to(ctx.x_dtype), None, None


dmd_gradient_loss.register_autograd(_backward, setup_context=_setup)
DMD_GRADIENT_LOSS = KernelOp("DmdGradientLoss", launch, dmd_gradient_loss, _setup, _backward)
