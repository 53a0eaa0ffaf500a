"""Forward noising x_t = alpha x0 + sigma eps in one pass, optionally drawing eps in-kernel.

Eager torch spends four launches (two broadcasts, two products, one sum, plus dtype casts); the kernel
reads x0 (and eps) once and writes x_t once. With ``draw=True`` eps comes from Philox (``tl.randn``) keyed
by a seed and the element index, and is written out too, so a loss can use the same eps as its target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.kernels._triton import (NUM_WARPS, KernelOp, block_offsets, elementwise, flat, rows, stride_of, tl,
                                  triton)
from core.parameterization import bcast

# --------------------------------------------------------------------------- torch reference


def add_noise_reference(x0: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    return bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps


def add_fresh_noise_reference(x0: Tensor, alpha, sigma, generator=None) -> tuple[Tensor, Tensor]:
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return add_noise_reference(x0, eps, alpha, sigma), eps


# --------------------------------------------------------------------------- Triton kernel


@triton.jit
def _add_noise_kernel(x0_ptr, eps_ptr, alpha_ptr, sigma_ptr, out_ptr, N, D, f_stride, seed,
                      DRAW: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = block_offsets(N, BLOCK)
    row = (offs // D) * f_stride
    a = tl.load(alpha_ptr + row, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sigma_ptr + row, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DRAW:
        # round eps to the output dtype first so the returned eps is exactly the one in x_t
        eps = tl.randn(seed, offs).to(eps_ptr.dtype.element_ty)
        tl.store(eps_ptr + offs, eps, mask=mask)
        eps = eps.to(tl.float32)
    else:
        eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (a * x0 + s * eps).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launcher


def launch(x0: Tensor, eps: Tensor | None, alpha: Tensor, sigma: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """x_t (and eps, drawn when ``eps`` is None). alpha, sigma: 1 or B values."""
    x0 = flat(x0)
    draw = eps is None
    dtype = x0.dtype if draw else torch.promote_types(x0.dtype, eps.dtype)
    eps = torch.empty_like(x0) if draw else flat(eps)
    out = torch.empty(x0.shape, dtype=dtype, device=x0.device)
    n = x0.numel()
    _, d = rows(x0)
    grid, block = elementwise(n)
    _add_noise_kernel[grid](x0, eps, alpha, sigma, out, n, d, stride_of(alpha), seed,
                            DRAW=draw, BLOCK=block, num_warps=NUM_WARPS)
    return out, eps


# --------------------------------------------------------------------------- custom ops + autograd


def noised(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return launch(x0, eps, alpha, sigma)[0]


@torch.library.custom_op("fewstep::add_noise", mutates_args=())
def add_noise(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return noised(x0, eps, alpha, sigma)


@add_noise.register_fake
def _(x0, eps, alpha, sigma):
    return x0.new_empty(x0.shape, dtype=torch.promote_types(x0.dtype, eps.dtype))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _scale(grad: Tensor, factor: Tensor, dtype: torch.dtype) -> Tensor:
    """grad * factor_b in fp32 (one rounding), cast to dtype: a single eager launch when it is fp32."""
    return (grad * factor.float().reshape(-1, *([1] * (grad.ndim - 1)))).to(dtype)


def _backward(ctx, grad):
    # d x_t / d x0 = alpha, d x_t / d eps = sigma: one per-sample scale each, nothing to fuse
    alpha, sigma = ctx.saved_tensors
    gx0 = _scale(grad, alpha, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    geps = _scale(grad, sigma, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return gx0, geps, None, None


add_noise.register_autograd(_backward, setup_context=_setup)
ADD_NOISE = KernelOp("AddNoise", noised, add_noise, _setup, _backward)


def fresh(x0: Tensor, alpha: Tensor, sigma: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    return launch(x0, None, alpha, sigma, seed)


@torch.library.custom_op("fewstep::add_fresh_noise", mutates_args=())
def add_fresh_noise(x0: Tensor, alpha: Tensor, sigma: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    return fresh(x0, alpha, sigma, seed)


@add_fresh_noise.register_fake
def _(x0, alpha, sigma, seed):
    return torch.empty_like(x0, memory_format=torch.contiguous_format), \
        torch.empty_like(x0, memory_format=torch.contiguous_format)


def _setup_fresh(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.mark_non_differentiable(output[1])


def _backward_fresh(ctx, grad, _grad_eps):
    (alpha,) = ctx.saved_tensors
    return _scale(grad, alpha, grad.dtype), None, None, None


add_fresh_noise.register_autograd(_backward_fresh, setup_context=_setup_fresh)
ADD_FRESH_NOISE = KernelOp("AddFreshNoise", fresh, add_fresh_noise, _setup_fresh, _backward_fresh)
