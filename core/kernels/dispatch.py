"""Which implementation an op runs: the fused Triton kernel or the torch reference.

``FEWSTEP_KERNELS`` = ``auto`` (default: Triton for CUDA tensors when triton is installed), ``torch``, or
``triton`` (forced; on CPU this needs TRITON_INTERPRET=1 set before triton is imported, which is how the
tests run the kernels). Inputs the kernels do not cover always take the torch reference: mismatched
shapes, float64, per-sample factors that need gradients, empty tensors or ones of 2^31 elements or more
(the kernels index with int32), and tensors inside torch.func transforms (jvp, vmap), which opaque
custom ops do not support. The kernels compute in fp32. Each kernel op is a ``_triton.KernelOp`` (one
entry point; it picks custom op, autograd.Function or bare launcher per call).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from core.errors import UsageError

ENV = "FEWSTEP_KERNELS"
MODES = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise UsageError(f"{ENV}='{value}' is not a kernel backend; set it to one of {', '.join(MODES)}")
    return value


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


# looked up once at import: torch.compile refuses to trace importlib (seen on an H100, where the "auto"
# path asks this inside every compiled op call)
TRITON_INSTALLED = _find_triton()


def _triton_installed() -> bool:
    return TRITON_INSTALLED


def covered(tensors: tuple[Tensor, ...], factors: tuple = ()) -> bool:
    """Whether the kernels handle these inputs (else the torch reference runs)."""
    first = tensors[0]
    if first.ndim == 0 or not 0 < first.numel() < 2**31:
        return False
    if not torch.compiler.is_compiling() and any(_functorch_wrapped(t) for t in (*tensors, *factors)):
        return False
    for t in tensors:
        if t.shape != first.shape or t.device != first.device or t.dtype not in KERNEL_DTYPES:
            return False
    for f in factors:
        if isinstance(f, Tensor):
            if f.requires_grad or f.numel() not in (1, first.shape[0]) or not f.is_floating_point():
                return False
    return True


def _functorch_wrapped(t) -> bool:
    return isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


def use_triton(tensors: tuple[Tensor | None, ...], factors: tuple = ()) -> bool:
    """Pick the implementation for one call; raises UsageError when a forced Triton cannot run."""
    choice = mode()
    if choice == "torch":
        return False
    tensors = tuple(t for t in tensors if t is not None)
    if choice == "auto" and not (tensors[0].device.type == "cuda" and _triton_installed()):
        return False  # the common CPU case, decided before the per-tensor checks
    if not covered(tensors, factors):
        return False
    on_cuda = tensors[0].device.type == "cuda"
    if on_cuda and not torch.compiler.is_compiling() and tensors[0].device.index not in (
            None, torch.cuda.current_device()):
        return False  # Triton launches on the current device; the runner sets it per rank
    if choice == "auto":
        return True  # on CUDA with triton installed (checked above)
    if not _triton_installed():
        raise UsageError(f"{ENV}=triton but triton is not installed; pip install triton or set {ENV}=torch")
    if not on_cuda:
        from core.kernels._triton import interpreting

        if not interpreting():
            raise UsageError(f"{ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                             f"imported; set it at process start or use {ENV}=torch")
    return True


def factors(like: Tensor, values: tuple) -> list[Tensor | None]:
    """Per-sample factors (Python numbers, 0-d or [B] tensors, None) as the kernels read them: contiguous 1-D
    tensors on like's device, all with 1 value or all with B values (the kernels share one stride).

    Contiguity matters: an expanded 0-d factor has B values but one element in memory (stride 0), and a
    column of a [B, K] tensor has stride K; both are copied here rather than read wrongly."""
    out = []
    for v in values:
        if v is not None:
            v = torch.as_tensor(v, device=like.device)
            v = (v if v.is_floating_point() else v.to(torch.float32)).reshape(-1)
        out.append(v)
    if len({t.numel() for t in out if t is not None}) > 1:
        out = [None if t is None else t.expand(like.shape[0]) for t in out]
    return [None if t is None else t.contiguous() for t in out]
