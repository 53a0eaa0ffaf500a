"""Every kernel launch the launchers make compiles with the real Triton compiler for an H100 (sm_90).

The interpreter accepts some code the compiler rejects (and the reverse), and no GPU is needed to
compile: Triton lowers to PTX and cubin for a named target. Each launcher runs on CPU tensors with its
kernel swapped for a recorder, so the compiled signatures are exactly the ones the launchers produce. The
check runs in a subprocess without TRITON_INTERPRET (this process may have imported triton in interpreter
mode for tests/test_kernels.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

TARGETS = [("cuda", 90, 32)]


class Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def launches():
    """(kernel, args, kwargs) for every launch path, recorded on small CPU tensors (fp32 and bf16)."""
    from core.kernels import add_noise, dmd, guided_x0, mm_loss, posterior, reduction, weighted_loss

    calls = []
    modules = [add_noise, dmd, guided_x0, mm_loss, posterior, reduction, weighted_loss]
    for m in modules:
        for name in [n for n in vars(m) if n.startswith("_") and n.endswith("_kernel")]:
            setattr(m, name, Recorder(getattr(m, name), calls))
    x, y, z = (torch.randn(2, 3, 5) for _ in range(3))
    xb = x.bfloat16()
    a, s = torch.rand(2), torch.rand(2)
    add_noise.launch(x, y, a, s)
    add_noise.launch(xb, xb, a, s)
    add_noise.launch(xb, None, a, s, seed=3)
    for pred in guided_x0.CODES:
        for out in guided_x0.OUTPUTS:
            guided_x0.launch(x, y, z, a, s, 2.0, pred, out)
            guided_x0.launch_backward(x, a, s, 2.0, True, pred, out)
    guided_x0.launch(xb, None, x, a, s, 1.0, "eps", "x0")
    guided_x0.launch_backward(xb, a, s, 1.0, False, "v", "x0")
    dmd.launch(x, y, z)
    dmd.launch(xb, y, z)
    posterior.launch(x, y, a, s, a, s, z, 1.0)
    posterior.launch(xb, xb, a, s, a, s, None, 0.0)
    posterior.launch_backward(x, a, s, a, s, 1.0, True)
    posterior.launch_backward(xb, a, s, a, s, 0.0, False)
    for kind in weighted_loss.KINDS:
        for w in (a, None):
            weighted_loss.launch(x, xb, w, kind)
            weighted_loss.launch_backward(torch.tensor(1.0), x, y, w, kind)
    for w in (a, None):
        mm_loss.launch(x, y, xb, w)
        mm_loss.launch_backward(torch.tensor(1.0), y, z, w, torch.bfloat16)
    return calls


def signature(kernel, args, kwargs):
    import triton

    names = kernel.arg_names
    sig, constexprs = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: unexpected argument {name}={value!r}")
    for name in names[len(args):]:
        sig[name] = "constexpr"
        constexprs[name] = kwargs[name]
    assert isinstance(kernel, triton.runtime.jit.JITFunction), "run without TRITON_INTERPRET"
    return sig, constexprs


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen, failures = set(), []
    for kernel, args, kwargs in launches():
        sig, constexprs = signature(kernel, args, kwargs)
        key = (kernel.fn.__name__, tuple(sig.items()), tuple(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        for target in TARGETS:
            try:
                triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=GPUTarget(*target))
            except Exception as e:  # report every failing variant, not just the first
                failures.append(f"{kernel.fn.__name__} {constexprs} {target}: {type(e).__name__}: {e}")
    print(f"compiled {len(seen)} kernel variants for {TARGETS}")
    print("\n".join(failures))
    return 1 if failures else 0


def test_every_kernel_variant_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "compiled" in proc.stdout


if __name__ == "__main__":
    sys.exit(main())


def test_the_backend_choice_traces_under_fullgraph_compile():
    """On CUDA the "auto" choice asks whether triton is installed inside every compiled op call; an
    importlib lookup there broke torch.compile(fullgraph=True) on an H100 (benchmarks/results/*-rerun.md)."""
    from core.kernels import dispatch

    probe = torch.compile(lambda x: x + dispatch._triton_installed(), backend="eager", fullgraph=True)
    assert probe(torch.zeros(1)).item() == float(dispatch.TRITON_INSTALLED)
