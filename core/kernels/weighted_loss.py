"""Per-sample weighted regression loss, mean_b w_b mean_{non-batch} l(pred - target), l = (.)^2 or |.|.

Used by the denoise objective (EDM's lambda(sigma)-weighted L2, Karras et al. 2022 eq. 2), the critics'
denoising losses and SFD. Forward: the shared reduction (``reduction.partial_sums``) writes a partial sum
per (chunk, sample), already scaled by w_b / (B D), then one small sum. Backward: one pass,
dL/dpred = g w_b / (B D) l'(pred - target), and dL/dtarget is its negative.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from core.kernels import reduction
from core.kernels._triton import (NUM_WARPS, KernelOp, block_offsets, elementwise, flat, rows, stride_of, tl,
                                  triton)
from core.kernels.reduction import mean_grad_scale

KINDS = ("l2", "l1")

# --------------------------------------------------------------------------- torch reference


def weighted_loss_reference(pred: Tensor, target: Tensor, weight=None, kind: str = "l2") -> Tensor:
    diff = pred - target
    per = diff.square() if kind == "l2" else diff.abs()
    per = per.flatten(1).mean(1)
    if weight is not None:
        per = per * torch.as_tensor(weight, dtype=per.dtype, device=per.device)
    return per.mean()


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _weighted_loss_bwd_kernel(grad_ptr, pred_ptr, target_ptr, weight_ptr, gpred_ptr, N, inv_bd, D,
                              w_stride, HAS_WEIGHT: tl.constexpr, L1: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = block_offsets(N, BLOCK)
    scale = mean_grad_scale(grad_ptr, weight_ptr, offs, mask, inv_bd, D, w_stride, HAS_WEIGHT)
    p = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    diff = p - t
    if L1:
        dl = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))  # sign, 0 at 0 like torch.abs
    else:
        dl = 2.0 * diff
    tl.store(gpred_ptr + offs, (scale * dl).to(gpred_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _check_kind(kind: str) -> bool:
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind '{kind}'; choose one of {KINDS}")
    return kind == "l1"


def launch(pred: Tensor, target: Tensor, weight: Tensor | None, kind: str) -> Tensor:
    term = "abs" if _check_kind(kind) else "square"
    b, d = rows(pred)
    partial = reduction.partial_sums(term, pred, target, weight=weight, inv_bd=1.0 / (b * d))
    return partial.sum().to(torch.promote_types(pred.dtype, target.dtype))


def launch_backward(grad: Tensor, pred: Tensor, target: Tensor, weight: Tensor | None, kind: str) -> Tensor:
    """dL/dpred in pred's dtype (dL/dtarget is its negative). grad: the 0-d upstream gradient."""
    l1 = _check_kind(kind)
    pred, target = flat(pred), flat(target)
    gpred = torch.empty_like(pred)
    _, d = rows(pred)
    n = pred.numel()
    grid, block = elementwise(n)
    _weighted_loss_bwd_kernel[grid](grad, pred, target, pred if weight is None else weight, gpred, n,
                                    1.0 / n, d, 0 if weight is None else stride_of(weight),
                                    HAS_WEIGHT=weight is not None, L1=l1, BLOCK=block, num_warps=NUM_WARPS)
    return gpred


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("fewstep::weighted_loss", mutates_args=())
def weighted_loss(pred: Tensor, target: Tensor, weight: Tensor | None, kind: str) -> Tensor:
    return launch(pred, target, weight, kind)


@weighted_loss.register_fake
def _(pred, target, weight, kind):
    return pred.new_empty((), dtype=torch.promote_types(pred.dtype, target.dtype))


@torch.library.custom_op("fewstep::weighted_loss_backward", mutates_args=())
def weighted_loss_backward(grad: Tensor, pred: Tensor, target: Tensor, weight: Tensor | None, kind: str) -> Tensor:
    return launch_backward(grad, pred, target, weight, kind)


@weighted_loss_backward.register_fake
def _(grad, pred, target, weight, kind):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    pred, target, weight, kind = inputs
    ctx.save_for_backward(pred, target, weight)
    ctx.kind = kind
    ctx.target_dtype = target.dtype


def _backward(ctx, grad, backward_op=weighted_loss_backward):
    pred, target, weight = ctx.saved_tensors
    gpred = backward_op(grad, pred, target, weight, ctx.kind)
    gtarget = (-gpred).to(ctx.target_dtype) if ctx.needs_input_grad[1] else None
    return gpred if ctx.needs_input_grad[0] else None, gtarget, None, None


weighted_loss.register_autograd(_backward, setup_context=_setup)
WEIGHTED_LOSS = KernelOp("WeightedLoss", launch, weighted_loss, _setup,
                         partial(_backward, backward_op=launch_backward))
