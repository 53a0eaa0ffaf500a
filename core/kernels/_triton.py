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
    """Per-sample factors are 1 value (stride 0, broadcast) or B values (stride 1)."""
    return 0 if factor.numel() == 1 else 1


def elementwise(n: int) -> tuple[tuple[int], int]:
    """(grid, BLOCK) for a flat elementwise kernel over n elements."""
    return (triton.cdiv(n, BLOCK),), BLOCK


def chunking(d: int) -> tuple[int, int, int]:
    """(C, CHUNK, BLOCK): reductions split each sample into C chunks of CHUNK elements (a multiple of BLOCK),
    C <= MAX_CHUNKS, so pass 2 can load all of a sample's partial sums at once."""
    blocks = triton.cdiv(d, BLOCK)
    chunk = triton.cdiv(blocks, MAX_CHUNKS) * BLOCK
    return triton.cdiv(d, chunk), chunk, BLOCK


def eager_autograd(name: str, forward, setup_context, backward) -> type:
    """A ``torch.autograd.Function`` running ``forward`` with a custom op's setup_context and backward.

    Eager calls that need autograd use it instead of the registered custom op: the same launcher and
    backward, without the dispatcher round trips (tens of microseconds of Python per call). Under
    torch.compile the custom op is used, so graphs stay whole."""

    def fwd(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(backward)})
