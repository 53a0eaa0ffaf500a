"""The per-sample chunked reduction the loss kernels share: partial sums of one term over [B, D] inputs.

    partial[b, c] = scale_b * sum_{i in chunk c of sample b} term(x_i, y_i, z_i)

with term ``abs`` |x - y| (DMD2's normaliser, the L1 loss), ``square`` (x - y)^2 (the L2 loss) or ``dot``
x (y - z) (moment matching's surrogate), and scale_b = inv_bd * w_b (w_b = 1 without a weight).
Program (chunk c, sample b) writes one fp32 partial; callers sum them (deterministic: no atomics). Each
sample is split into C <= MAX_CHUNKS chunks, so a second pass can load all of a sample's partials at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.kernels._triton import NUM_WARPS, chunking, flat, load_per_sample, rows, stride_of, tl, triton

TERMS = {"abs": 0, "square": 1, "dot": 2}  # the TERM constexpr


@triton.jit
def _partial_sums_kernel(x_ptr, y_ptr, z_ptr, weight_ptr, partial_ptr, inv_bd, D, C, CHUNK, w_stride,
                         TERM: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """Program (chunk c, sample b): scale_b times the sum of the term over the chunk, in fp32."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK):
        cols = c * CHUNK + start + tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(x_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        if TERM == 2:
            z = tl.load(z_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
            acc += x * (y - z)
        elif TERM == 1:
            acc += (x - y) * (x - y)
        else:
            acc += tl.abs(x - y)
    scale = inv_bd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + b * w_stride).to(tl.float32)
    tl.store(partial_ptr + b * C + c, tl.sum(acc, axis=0) * scale)


@triton.jit
def mean_grad_scale(grad_ptr, weight_ptr, offs, mask, inv_bd, D, w_stride, HAS_WEIGHT: tl.constexpr):
    """The backward of a loss ``sum_b w_b sum_i term_i * inv_bd``: each element's term gets the upstream
    scalar gradient times inv_bd (times its sample's w_b)."""
    scale = tl.load(grad_ptr).to(tl.float32) * inv_bd
    if HAS_WEIGHT:
        scale = scale * load_per_sample(weight_ptr, offs, D, w_stride, mask, 0.0)
    return scale


def partial_sums(term: str, x: Tensor, y: Tensor, z: Tensor | None = None, weight: Tensor | None = None,
                 inv_bd: float = 1.0) -> Tensor:
    """fp32 partial sums, shape [B, C] (row-major: sample b's C partials are contiguous).

    x, y (and z for ``dot``) are contiguous with the same shape; weight: None or 1 or B values."""
    x, y = flat(x), flat(y)
    b, d = rows(x)
    c, chunk, block = chunking(d)
    partial = torch.empty(b, c, dtype=torch.float32, device=x.device)
    _partial_sums_kernel[(c, b)](x, y, x if z is None else flat(z), x if weight is None else weight, partial,
                                 float(inv_bd), d, c, chunk, 0 if weight is None else stride_of(weight),
                                 TERM=TERMS[term], HAS_WEIGHT=weight is not None, BLOCK=block,
                                 num_warps=NUM_WARPS)
    return partial
