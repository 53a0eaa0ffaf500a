"""Triton import shim and launch helpers shared by the kernel files.

Kernel files import ``triton``/``tl`` from here so they still import (and their torch references still
work) where triton is not installed. Nothing in ``core`` imports this module until an op runs, so a test
process can set TRITON_INTERPRET=1 before triton is imported (Triton decides interpreter vs compiler
when ``@triton.jit`` decorates, i.e. at import).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # the torch references keep working; dispatch never picks Triton

    class _Missing:
        """Stands in for ``triton`` and ``triton.language`` so the kernel definitions still parse."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            raise RuntimeError("triton is not installed; pip install triton (or fewstep[kernels])")

    triton = tl = _Missing()
    AVAILABLE = False

if AVAILABLE:  # Triton's own library (tl.sum, tl.randn) was decorated when it was imported, just now
    from triton.runtime.interpreter import InterpretedFunction

    _INTERPRETING = isinstance(tl.standard.sum, InterpretedFunction)
else:
    _INTERPRETING = False

BLOCK = 1024  # elements per program; tests lower it to exercise several programs on small shapes
MAX_CHUNKS = 2048  # reductions: most partial sums per sample (pass 2 loads them all in one block)
NUM_WARPS = 4  # the interpreter ignores it


def interpreting() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1: kernels then run on CPU tensors."""
    return _INTERPRETING



@triton.jit
def block_offsets(N, BLOCK: tl.constexpr):
    """This program's flat element offsets and the mask of those below N."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def load_per_sample(ptr, offs, D, stride, mask, other):
    """Each flat [B, D] element's per-sample factor (sample offs // D; stride 0 or 1, ``stride_of``), in fp32."""
    return tl.load(ptr + (offs // D) * stride, mask=mask, other=other).to(tl.float32)


def flat(x: torch.Tensor) -> torch.Tensor:
    """A contiguous view (or copy) of x; kernels index [B, D] row-major."""
    return x if x.is_contiguous() else x.contiguous()


def rows(x: torch.Tensor) -> tuple[int, int]:
    """(B, D): batch size and elements per sample."""
    n = x.numel()
    if n >= 2**31:
        raise ValueError(f"the kernels index with int32; {n} elements is too many (core.ops falls back to torch)")
    return x.shape[0], (n // x.shape[0] if x.shape[0] else 0)


def stride_of(factor: torch.Tensor) -> int:
    """Per-sample factors are 1 value (stride 0, broadcast) or B contiguous values (stride 1).

    ``core.kernels.dispatch.factors`` makes them so; an expanded or strided view would be read wrongly
    (an expanded 0-d factor has stride 0 and one element in memory), so it is refused here."""
    if factor.numel() == 1:
        return 0
    if factor.ndim != 1 or factor.stride(0) != 1:
        raise ValueError(f"per-sample factors must be contiguous 1-D tensors, got shape {tuple(factor.shape)} "
                         f"stride {factor.stride()}; pass factor.contiguous()")
    return 1


def elementwise(n: int) -> tuple[tuple[int], int]:
    """(grid, BLOCK) for a flat elementwise kernel over n elements."""
    return (triton.cdiv(n, BLOCK),), BLOCK


def chunking(d: int) -> tuple[int, int, int]:
    """(C, CHUNK, BLOCK): reductions split each sample into C chunks of CHUNK elements (a multiple of BLOCK),
    C <= MAX_CHUNKS, so pass 2 can load all of a sample's partial sums at once."""
    blocks = triton.cdiv(d, BLOCK)
    chunk = triton.cdiv(blocks, MAX_CHUNKS) * BLOCK
    return triton.cdiv(d, chunk), chunk, BLOCK


class KernelOp:
    """One fused op's entry points, all running the same launcher and backward.

    - under torch.compile: the registered custom op (opaque, so graphs stay whole);
    - eager with autograd (a tensor argument requires grad): a plain ``torch.autograd.Function`` built from
      the custom op's ``setup_context`` and an eager ``backward`` (no dispatcher round trips);
    - eager without autograd: the launcher itself.
    The custom-op dispatcher costs tens of microseconds of Python per call on a CPU host, comparable to a
    whole SDXL-latent-sized kernel, hence the eager shortcuts."""

    def __init__(self, name: str, launch, custom_op, setup_context, backward):
        def forward(ctx, *args):
            out = launch(*args)
            setup_context(ctx, args, out)
            return out

        self.launch, self.custom_op = launch, custom_op
        self.autograd = type(name, (torch.autograd.Function,),
                             {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.custom_op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.autograd.apply(*args)
        return self.launch(*args)
