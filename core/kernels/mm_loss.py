"""Moment matching's generator surrogate (Salimans et al. 2024, Alg. 2), fused.

    L = mean_b w_b <x~_b, sg(aux_b - teacher_b)> / D,      dL/dx~ = w_b (aux - teacher) / (B D)

Descent moves x~ toward the teacher's first moment and away from the auxiliary model's. Forward: the shared
reduction's per-(chunk, sample) partial sums; backward: one pass that forms the direction and scales it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from core.kernels import reduction
from core.kernels._triton import (NUM_WARPS, KernelOp, block_offsets, elementwise, flat, rows, stride_of, tl,
                                  triton)
from core.kernels.reduction import mean_grad_scale

# --------------------------------------------------------------------------- torch reference


def mm_generator_loss_reference(x_tilde: Tensor, aux_x0: Tensor, teacher_x0: Tensor, weight=None) -> Tensor:
    direction = (aux_x0 - teacher_x0).detach()
    per = (x_tilde * direction).flatten(1).mean(1)
    if weight is not None:
        per = per * torch.as_tensor(weight, dtype=per.dtype, device=per.device)
    return per.mean()


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _mm_generator_loss_bwd_kernel(grad_ptr, aux_ptr, teacher_ptr, weight_ptr, gx_ptr, N, inv_bd, D,
                                  w_stride, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = block_offsets(N, BLOCK)
    scale = mean_grad_scale(grad_ptr, weight_ptr, offs, mask, inv_bd, D, w_stride, HAS_WEIGHT)
    a = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(teacher_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gx_ptr + offs, (scale * (a - t)).to(gx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _out_dtype(x: Tensor, aux: Tensor, teacher: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.promote_types(aux.dtype, teacher.dtype))


def launch(x_tilde: Tensor, aux_x0: Tensor, teacher_x0: Tensor, weight: Tensor | None) -> Tensor:
    b, d = rows(x_tilde)
    partial = reduction.partial_sums("dot", x_tilde, aux_x0, teacher_x0, weight, inv_bd=1.0 / (b * d))
    return partial.sum().to(_out_dtype(x_tilde, aux_x0, teacher_x0))


def launch_backward(grad: Tensor, aux_x0: Tensor, teacher_x0: Tensor, weight: Tensor | None,
                    dtype: torch.dtype) -> Tensor:
    """dL/dx~ (in x~'s dtype); x~ itself is not needed, the surrogate is linear in it. grad: the 0-d upstream."""
    aux, teacher = flat(aux_x0), flat(teacher_x0)
    gx = torch.empty(aux.shape, dtype=dtype, device=aux.device)
    n = aux.numel()
    _, d = rows(aux)
    grid, block = elementwise(n)
    _mm_generator_loss_bwd_kernel[grid](grad, aux, teacher, aux if weight is None else weight, gx, n,
                                        1.0 / n, d, 0 if weight is None else stride_of(weight),
                                        HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=NUM_WARPS)
    return gx


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("fewstep::mm_generator_loss", mutates_args=())
def mm_generator_loss(x_tilde: Tensor, aux_x0: Tensor, teacher_x0: Tensor, weight: Tensor | None) -> Tensor:
    return launch(x_tilde, aux_x0, teacher_x0, weight)


@mm_generator_loss.register_fake
def _(x_tilde, aux_x0, teacher_x0, weight):
    return x_tilde.new_empty((), dtype=_out_dtype(x_tilde, aux_x0, teacher_x0))


@torch.library.custom_op("fewstep::mm_generator_loss_backward", mutates_args=())
def mm_generator_loss_backward(grad: Tensor, aux_x0: Tensor, teacher_x0: Tensor, weight: Tensor | None,
                               dtype: torch.dtype) -> Tensor:
    return launch_backward(grad, aux_x0, teacher_x0, weight, dtype)


@mm_generator_loss_backward.register_fake
def _(grad, aux_x0, teacher_x0, weight, dtype):
    return aux_x0.new_empty(aux_x0.shape, dtype=dtype)


def _setup(ctx, inputs, output):
    x, aux, teacher, weight = inputs
    ctx.save_for_backward(aux, teacher, weight)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad, backward_op=mm_generator_loss_backward):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    aux, teacher, weight = ctx.saved_tensors
    return backward_op(grad, aux, teacher, weight, ctx.x_dtype), None, None, None


mm_generator_loss.register_autograd(_backward, setup_context=_setup)
MM_GENERATOR_LOSS = KernelOp("MMGeneratorLoss", launch, mm_generator_loss, _setup,
                             partial(_backward, backward_op=launch_backward))
