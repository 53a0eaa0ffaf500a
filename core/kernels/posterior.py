"""A draw from the DDIM(eta) posterior q(z_s | z_t, x0), s < t, in one pass (Song et al. 2021, eq. 12).

With sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2, the posterior std is
c = eta sigma_s sigma_{t|s} / sigma_t and the mean is alpha_s x0 + k eps_hat, k = sqrt(sigma_s^2 - c^2),
eps_hat = (z_t - alpha_t x0) / sigma_t. eta = 1 is the exact Gaussian posterior, eta = 0 deterministic DDIM.
Collected per sample: z_s = P x0 + Q z_t + c noise, P = alpha_s - k alpha_t / sigma_t, Q = k / sigma_t,
which the kernel forms in registers from the four schedule values.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from core.kernels._triton import (NUM_WARPS, KernelOp, block_offsets, elementwise, flat, load_per_sample, rows,
                                  stride_of, tl, triton)
from core.parameterization import bcast

# --------------------------------------------------------------------------- torch reference


def posterior_sample_reference(z_t: Tensor, x0: Tensor, alpha_t, sigma_t, alpha_s, sigma_s, noise: Tensor | None,
                               eta: float = 1.0) -> Tensor:
    at, st, as_, ss = (bcast(v, z_t) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    eps_hat = (z_t - at * x0) / st
    var_ts = (st * st - (at / as_) ** 2 * ss * ss).clamp(min=0)
    c = eta * ss * var_ts.sqrt() / st
    mean = as_ * x0 + (ss * ss - c * c).clamp(min=0).sqrt() * eps_hat
    if noise is None or eta == 0:
        return mean
    return mean + c * noise


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _coefficients(at, st, as_, ss, eta):
    """(P, Q, c): z_s = P x0 + Q z_t + c noise.

    IEEE-rounded sqrt and division (``tl.sqrt`` and ``/`` are approximate on GPUs), and no difference of
    squares left to cancel: sigma_{t|s}^2 = (st - r ss)(st + r ss) with r = at / as_, and
    ss^2 - c^2 = (ss / st)^2 (st^2 (1 - eta^2) + eta^2 (st^2 - sigma_{t|s}^2)), where
    st^2 - sigma_{t|s}^2 = min(st^2, (r ss)^2).
    """
    rs = tl.div_rn(at, as_) * ss
    var_ts = tl.maximum((st - rs) * (st + rs), 0.0)
    c = eta * tl.div_rn(ss * tl.sqrt_rn(var_ts), st)
    kept = tl.maximum(st * st * (1.0 - eta * eta) + eta * eta * tl.minimum(st * st, rs * rs), 0.0)
    k = tl.div_rn(ss * tl.sqrt_rn(kept), st)
    q = tl.div_rn(k, st)
    return as_ - q * at, q, c


@triton.jit
def _row_coefficients(at_ptr, st_ptr, as_ptr, ss_ptr, offs, D, f_stride, mask, eta):
    """``_coefficients`` of each element's sample, from the four per-sample factors."""
    at = load_per_sample(at_ptr, offs, D, f_stride, mask, 1.0)
    st = load_per_sample(st_ptr, offs, D, f_stride, mask, 1.0)
    as_ = load_per_sample(as_ptr, offs, D, f_stride, mask, 1.0)
    ss = load_per_sample(ss_ptr, offs, D, f_stride, mask, 1.0)
    return _coefficients(at, st, as_, ss, eta)


@triton.jit
def _posterior_sample_kernel(zt_ptr, x0_ptr, noise_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, out_ptr, N, D,
                             f_stride, eta, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = block_offsets(N, BLOCK)
    P, Q, c = _row_coefficients(at_ptr, st_ptr, as_ptr, ss_ptr, offs, D, f_stride, mask, eta)
    z = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = P * x0 + Q * z
    if HAS_NOISE:
        out += c * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _posterior_sample_bwd_kernel(grad_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, gzt_ptr, gx0_ptr, gnoise_ptr, N, D,
                                 f_stride, eta, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """Linear in (z_t, x0, noise): the gradients are Q g, P g, c g from one read of g."""
    offs, mask = block_offsets(N, BLOCK)
    P, Q, c = _row_coefficients(at_ptr, st_ptr, as_ptr, ss_ptr, offs, D, f_stride, mask, eta)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gzt_ptr + offs, (Q * g).to(gzt_ptr.dtype.element_ty), mask=mask)
    tl.store(gx0_ptr + offs, (P * g).to(gx0_ptr.dtype.element_ty), mask=mask)
    if HAS_NOISE:
        tl.store(gnoise_ptr + offs, (c * g).to(gnoise_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _out_dtype(z_t: Tensor, x0: Tensor, noise: Tensor | None) -> torch.dtype:
    dtype = torch.promote_types(z_t.dtype, x0.dtype)
    return dtype if noise is None else torch.promote_types(dtype, noise.dtype)


def launch(z_t: Tensor, x0: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor,
           noise: Tensor | None, eta: float) -> Tensor:
    """All four factors must have the same number of values (1 or B)."""
    z_t, x0 = flat(z_t), flat(x0)
    noise = None if noise is None or eta == 0 else flat(noise)
    out = torch.empty(z_t.shape, dtype=_out_dtype(z_t, x0, noise), device=z_t.device)
    n = z_t.numel()
    _, d = rows(z_t)
    grid, block = elementwise(n)
    _posterior_sample_kernel[grid](z_t, x0, z_t if noise is None else noise, alpha_t, sigma_t, alpha_s,
                                   sigma_s, out, n, d, stride_of(alpha_t), float(eta),
                                   HAS_NOISE=noise is not None, BLOCK=block, num_warps=NUM_WARPS)
    return out


def launch_backward(grad: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor,
                    eta: float, has_noise: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (z_t, x0, noise) in the upstream gradient's dtype (noise's is empty without noise)."""
    grad = flat(grad)
    gzt, gx0 = torch.empty_like(grad), torch.empty_like(grad)
    gnoise = torch.empty_like(grad) if has_noise else grad.new_empty(0)
    n = grad.numel()
    _, d = rows(grad)
    grid, block = elementwise(n)
    _posterior_sample_bwd_kernel[grid](grad, alpha_t, sigma_t, alpha_s, sigma_s, gzt, gx0,
                                       gnoise if has_noise else gzt, n, d, stride_of(alpha_t), float(eta),
                                       HAS_NOISE=has_noise, BLOCK=block, num_warps=NUM_WARPS)
    return gzt, gx0, gnoise


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("fewstep::posterior_sample", mutates_args=())
def posterior_sample(z_t: Tensor, x0: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor,
                     sigma_s: Tensor, noise: Tensor | None, eta: float) -> Tensor:
    return launch(z_t, x0, alpha_t, sigma_t, alpha_s, sigma_s, noise, eta)


@posterior_sample.register_fake
def _(z_t, x0, alpha_t, sigma_t, alpha_s, sigma_s, noise, eta):
    return z_t.new_empty(z_t.shape, dtype=_out_dtype(z_t, x0, None if eta == 0 else noise))


@torch.library.custom_op("fewstep::posterior_sample_backward", mutates_args=())
def posterior_sample_backward(grad: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor,
                              eta: float, has_noise: bool) -> tuple[Tensor, Tensor, Tensor]:
    return launch_backward(grad, alpha_t, sigma_t, alpha_s, sigma_s, eta, has_noise)


@posterior_sample_backward.register_fake
def _(grad, alpha_t, sigma_t, alpha_s, sigma_s, eta, has_noise):
    return grad.new_empty(grad.shape), grad.new_empty(grad.shape), \
        (grad.new_empty(grad.shape) if has_noise else grad.new_empty(0))


def _setup(ctx, inputs, output):
    z_t, x0, at, st, as_, ss, noise, eta = inputs
    ctx.save_for_backward(at, st, as_, ss)
    ctx.has_noise = noise is not None and eta != 0
    ctx.eta = eta
    ctx.dtypes = (z_t.dtype, x0.dtype, None if noise is None else noise.dtype)


def _backward(ctx, grad, backward_op=posterior_sample_backward):
    gzt, gx0, gnoise = backward_op(grad, *ctx.saved_tensors, ctx.eta, ctx.has_noise)
    need = ctx.needs_input_grad
    return (gzt.to(ctx.dtypes[0]) if need[0] else None, gx0.to(ctx.dtypes[1]) if need[1] else None,
            None, None, None, None, gnoise.to(ctx.dtypes[2]) if need[6] and ctx.has_noise else None, None)


posterior_sample.register_autograd(_backward, setup_context=_setup)
POSTERIOR_SAMPLE = KernelOp("PosteriorSample", launch, posterior_sample, _setup,
                            partial(_backward, backward_op=launch_backward))
