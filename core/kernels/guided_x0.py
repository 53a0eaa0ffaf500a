"""Classifier-free guidance + conversion of the network output to x0 (or to the score) in one pass.

p = u + w (c - u) (Ho & Salimans 2022), then x0 (or grad log p_t = (alpha x0 - x_t) / sigma^2, Tweedie) is
A x_t + S p with per-sample coefficients that depend only on the prediction kind, alpha and sigma
(``core.parameterization``). The kernel computes A, S from alpha, sigma in registers, so a guided x0 costs
one read of each input and one write, where eager torch runs about eight launches.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from core.kernels._triton import (NUM_WARPS, KernelOp, block_offsets, elementwise, flat, load_per_sample, rows,
                                  stride_of, tl, triton)
from core.parameterization import PREDICTIONS, to_x0, x0_to_score

OUTPUTS = ("x0", "score")
CODES = {"x0": 0, "eps": 1, "v": 2, "flow": 3}  # PREDICTION constexpr of the kernels

# --------------------------------------------------------------------------- torch reference


def guided_x0_reference(pred_cond: Tensor, pred_uncond: Tensor | None, x_t: Tensor, alpha, sigma, scale: float,
                        prediction: str, output: str = "x0") -> Tensor:
    # guidance is linear, so combining outputs then converting equals converting then combining
    pred = pred_cond if pred_uncond is None else pred_uncond + scale * (pred_cond - pred_uncond)
    x0 = to_x0(pred, x_t, alpha, sigma, prediction)
    return x0 if output == "x0" else x0_to_score(x0, x_t, alpha, sigma)


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _coefficients(a, s, PREDICTION: tl.constexpr, SCORE: tl.constexpr):
    """(A, S) with out = A x_t + S p. The score forms are simplified so no term cancels at small sigma:
    score = -eps_hat / sigma."""
    if PREDICTION == 0:  # x0
        if SCORE:
            A = -1.0 / (s * s)
            S = a / (s * s)
        else:
            A = a * 0.0
            S = a * 0.0 + 1.0
    elif PREDICTION == 1:  # eps: x0 = (x - s eps) / a
        if SCORE:
            A = a * 0.0
            S = -1.0 / s
        else:
            A = 1.0 / a
            S = -s / a
    elif PREDICTION == 2:  # v = a eps - s x0: x0 = (a x - s v) / (a^2 + s^2)
        r = 1.0 / (a * a + s * s)
        if SCORE:
            A = -r
            S = -a * r / s
        else:
            A = a * r
            S = -s * r
    else:  # flow v = eps - x0: x0 = (x - s v) / (a + s)
        r = 1.0 / (a + s)
        if SCORE:
            A = -r / s
            S = -a * r / s
        else:
            A = r
            S = -s * r
    return A, S


@triton.jit
def _row_coefficients(alpha_ptr, sigma_ptr, offs, D, f_stride, mask, PREDICTION: tl.constexpr, SCORE: tl.constexpr):
    """``_coefficients`` of each element's sample, from its per-sample alpha and sigma."""
    a = load_per_sample(alpha_ptr, offs, D, f_stride, mask, 1.0)
    s = load_per_sample(sigma_ptr, offs, D, f_stride, mask, 1.0)
    return _coefficients(a, s, PREDICTION, SCORE)


@triton.jit
def _guided_x0_kernel(cond_ptr, uncond_ptr, xt_ptr, alpha_ptr, sigma_ptr, out_ptr, N, D, f_stride, scale,
                      HAS_UNCOND: tl.constexpr, PREDICTION: tl.constexpr, SCORE: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs, mask = block_offsets(N, BLOCK)
    A, S = _row_coefficients(alpha_ptr, sigma_ptr, offs, D, f_stride, mask, PREDICTION, SCORE)
    p = tl.load(cond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = u + scale * (p - u)
    if PREDICTION == 0 and not SCORE:
        out = p
    else:
        x = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = A * x + S * p
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _guided_x0_bwd_kernel(grad_ptr, alpha_ptr, sigma_ptr, gcond_ptr, guncond_ptr, gxt_ptr, N, D, f_stride, scale,
                          HAS_UNCOND: tl.constexpr, PREDICTION: tl.constexpr, SCORE: tl.constexpr,
                          BLOCK: tl.constexpr):
    """The op is linear: d/dc = S w, d/du = S (1 - w), d/dx_t = A, all in one read of the upstream grad."""
    offs, mask = block_offsets(N, BLOCK)
    A, S = _row_coefficients(alpha_ptr, sigma_ptr, offs, D, f_stride, mask, PREDICTION, SCORE)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        tl.store(gcond_ptr + offs, (scale * S * g).to(gcond_ptr.dtype.element_ty), mask=mask)
        tl.store(guncond_ptr + offs, ((1.0 - scale) * S * g).to(guncond_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(gcond_ptr + offs, (S * g).to(gcond_ptr.dtype.element_ty), mask=mask)
    tl.store(gxt_ptr + offs, (A * g).to(gxt_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _codes(prediction: str, output: str) -> tuple[int, bool]:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type '{prediction}'; choose one of {PREDICTIONS}")
    if output not in OUTPUTS:
        raise ValueError(f"unknown output '{output}'; choose one of {OUTPUTS}")
    return CODES[prediction], output == "score"


def _out_dtype(cond: Tensor, uncond: Tensor | None, x_t: Tensor) -> torch.dtype:
    dtype = torch.promote_types(cond.dtype, x_t.dtype)
    return dtype if uncond is None else torch.promote_types(dtype, uncond.dtype)


def launch(cond: Tensor, uncond: Tensor | None, x_t: Tensor, alpha: Tensor, sigma: Tensor, scale: float,
           prediction: str, output: str) -> Tensor:
    code, score = _codes(prediction, output)
    cond, x_t = flat(cond), flat(x_t)
    uncond = None if uncond is None else flat(uncond)
    out = torch.empty(cond.shape, dtype=_out_dtype(cond, uncond, x_t), device=cond.device)
    n = cond.numel()
    _, d = rows(cond)
    grid, block = elementwise(n)
    _guided_x0_kernel[grid](cond, cond if uncond is None else uncond, x_t, alpha, sigma, out, n, d,
                            stride_of(alpha), float(scale), HAS_UNCOND=uncond is not None,
                            PREDICTION=code, SCORE=score, BLOCK=block, num_warps=NUM_WARPS)
    return out


def launch_backward(grad: Tensor, alpha: Tensor, sigma: Tensor, scale: float, has_uncond: bool,
                    prediction: str, output: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (pred_cond, pred_uncond, x_t), in the upstream gradient's dtype."""
    code, score = _codes(prediction, output)
    grad = flat(grad)
    gcond, gxt = torch.empty_like(grad), torch.empty_like(grad)
    guncond = torch.empty_like(grad) if has_uncond else grad.new_empty(0)
    n = grad.numel()
    _, d = rows(grad)
    grid, block = elementwise(n)
    _guided_x0_bwd_kernel[grid](grad, alpha, sigma, gcond, guncond if has_uncond else gcond, gxt, n, d,
                                stride_of(alpha), float(scale), HAS_UNCOND=has_uncond,
                                PREDICTION=code, SCORE=score, BLOCK=block, num_warps=NUM_WARPS)
    return gcond, guncond, gxt


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("fewstep::guided_x0", mutates_args=())
def guided_x0(pred_cond: Tensor, pred_uncond: Tensor | None, x_t: Tensor, alpha: Tensor, sigma: Tensor,
              scale: float, prediction: str, output: str) -> Tensor:
    return launch(pred_cond, pred_uncond, x_t, alpha, sigma, scale, prediction, output)


@guided_x0.register_fake
def _(pred_cond, pred_uncond, x_t, alpha, sigma, scale, prediction, output):
    return pred_cond.new_empty(pred_cond.shape, dtype=_out_dtype(pred_cond, pred_uncond, x_t))


@torch.library.custom_op("fewstep::guided_x0_backward", mutates_args=())
def guided_x0_backward(grad: Tensor, alpha: Tensor, sigma: Tensor, scale: float, has_uncond: bool,
                       prediction: str, output: str) -> tuple[Tensor, Tensor, Tensor]:
    return launch_backward(grad, alpha, sigma, scale, has_uncond, prediction, output)


@guided_x0_backward.register_fake
def _(grad, alpha, sigma, scale, has_uncond, prediction, output):
    uncond = grad.new_empty(grad.shape) if has_uncond else grad.new_empty(0)
    return grad.new_empty(grad.shape), uncond, grad.new_empty(grad.shape)


def _setup(ctx, inputs, output):
    cond, uncond, x_t, alpha, sigma, scale, prediction, out_kind = inputs
    ctx.save_for_backward(alpha, sigma)
    ctx.args = (scale, uncond is not None, prediction, out_kind)
    ctx.dtypes = (cond.dtype, None if uncond is None else uncond.dtype, x_t.dtype)


def _backward(ctx, grad, backward_op=guided_x0_backward):
    alpha, sigma = ctx.saved_tensors
    gcond, guncond, gxt = backward_op(grad, alpha, sigma, *ctx.args)
    need = ctx.needs_input_grad

    def cast(g, i):
        return g.to(ctx.dtypes[i]) if need[i] else None

    return cast(gcond, 0), (cast(guncond, 1) if ctx.args[1] else None), cast(gxt, 2), None, None, None, None, None


guided_x0.register_autograd(_backward, setup_context=_setup)
GUIDED_X0 = KernelOp("GuidedX0", launch, guided_x0, _setup, partial(_backward, backward_op=launch_backward))
