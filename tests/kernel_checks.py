"""Shared set-up of the kernel tests (tests/test_kernels.py, tests/test_kernels_dispatch.py).

On CPU the kernels run under the Triton interpreter. Triton picks interpreter or compiler when ``@triton.jit``
decorates, so TRITON_INTERPRET=1 is set here, when a kernel test module imports this one at collection,
before triton is imported; if something in this process imported triton earlier, the in-process tests skip
and each module's ``test_suite_in_a_fresh_process`` runs it in a clean subprocess instead.
``FEWSTEP_TEST_DEVICE=cuda`` runs the same modules on a GPU with compiled kernels (tests/test_kernels_gpu.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

DEVICE = os.environ.get("FEWSTEP_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from core.kernels import _triton  # noqa: E402

IN_PROCESS = _triton.AVAILABLE and (_triton.interpreting() if DEVICE == "cpu" else torch.cuda.is_available())
REASON = ("triton not installed" if not _triton.AVAILABLE else
          "triton was imported before TRITON_INTERPRET=1 was set; test_suite_in_a_fresh_process covers this file"
          if DEVICE == "cpu" else "no CUDA device")
kernels = pytest.mark.skipif(not IN_PROCESS, reason=REASON)
FRESH_PROCESS_NEEDED = not IN_PROCESS and _triton.AVAILABLE and DEVICE == "cpu"

SHAPES = [(3, 5, 7, 9), (2, 4, 16, 16), (5, 3)]  # odd D=315, even D=1024, tiny D=3
DTYPES = [torch.float32, torch.bfloat16]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "", ulps: float = 1.0):
    """Kernels compute in fp32 and round once on store (the interpreter truncates): one output ulp, plus
    fp32 rounding relative to the largest value (cancellation in x - sigma * eps)."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64 = out.double().cpu()
    ref = ref.cpu()
    scale = ref.abs().max().clamp(min=1e-30)
    tol = 1.01 * ulps * ULP[dtype] * ref.abs() + 8 * ULP[torch.float32] * scale + 1e-12  # floor: float64 noise around 0
    err = (out64 - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off, worst {err.max():.3g} at "
                           f"{tuple(int(i) for i in (err == err.max()).nonzero()[0])} (tol {tol.max():.3g})")


def make(shape, dtype, *, lo=-2.0, hi=2.0):
    return (torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo).to(dtype).to(DEVICE)


def grads_match(run_kernel, run_ref, inputs, dtype, differentiable, grad_ulps=1.0, out_dtype=None):
    """Forward (in out_dtype, default dtype) and every gradient of run_kernel (on inputs) vs run_ref on float64
    copies, one shared upstream grad."""
    ins = [t.clone().requires_grad_(i in differentiable) for i, t in enumerate(inputs)]
    ins64 = [t.detach().double().requires_grad_(i in differentiable) for i, t in enumerate(inputs)]
    out, ref = run_kernel(*ins), run_ref(*ins64)
    assert_close(out, ref, out_dtype or dtype, "forward")
    up = make(ref.shape, out.dtype)
    out.backward(up)
    ref.backward(up.double())
    for i in differentiable:
        ref_grad = torch.zeros_like(ins64[i]) if ins64[i].grad is None else ins64[i].grad  # unused input
        assert_close(ins[i].grad, ref_grad, inputs[i].dtype, f"grad of input {i}", grad_ulps)


def factors(b, lo, hi):
    return (torch.rand(b, dtype=torch.float64) * (hi - lo) + lo).to(DEVICE)


def run_in_fresh_process(path: str) -> None:
    """pytest on one kernel test module in a subprocess that sets TRITON_INTERPRET=1 before importing triton."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FEWSTEP_TEST_DEVICE": "cpu"}
    env.pop("FEWSTEP_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-x", "-p", "no:cacheprovider",
                           "-p", "no:xdist"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
