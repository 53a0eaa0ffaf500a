"""Hot-path ops: fused (``core.ops`` on the Triton path) vs eager torch vs ``torch.compile``.

    .venv/bin/python -m pytest benchmarks/bench_kernels.py --benchmark-only

Rows of one group (``<op>-<size>``) run the same math on the same inputs:
- ``eager``: the op's torch reference (what ``core.ops`` runs on CPU), one launch per torch op;
- ``compiled``: ``torch.compile`` of that reference (Inductor fuses the elementwise chain);
- ``fused``: ``core.ops`` with the Triton kernels (CUDA only: on CPU the ops run the eager row).
Losses are timed forward + backward, the other ops forward only. ``extra_info`` carries achieved GB/s
from the *compulsory* traffic (each input read once, each output written once), and on CUDA its fraction
of the measured device copy bandwidth. Sizes: SDXL's latent batch 2x4x128x128, and a large size (4M
elements on CPU, 32M on CUDA, beyond the GPU's L2). fp32 throughout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from core import ops
from core.kernels.add_noise import add_fresh_noise_reference, add_noise_reference
from core.kernels.dmd import dmd_loss_reference
from core.kernels.guided_x0 import guided_x0_reference
from core.kernels.mm_loss import mm_generator_loss_reference
from core.kernels.posterior import posterior_sample_reference
from core.kernels.weighted_loss import weighted_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {"sdxl-latent": (2, 4, 128, 128), "large": (16, 4, 256, 256) if DEVICE == "cpu" else (32, 16, 256, 256)}


@dataclass(frozen=True)
class Case:
    name: str
    inputs: Callable[[tuple], dict]  # shape -> named inputs
    eager: Callable  # the torch reference, called with **inputs
    fused: Callable  # the public op (Triton on CUDA), called with **inputs
    tensors_moved: int  # compulsory full-size tensor reads + writes
    backward: str | None = None  # name of the input whose gradient a loss case computes


def _t(shape, requires_grad=False):
    return torch.randn(shape, device=DEVICE, requires_grad=requires_grad)


def _f(shape, lo=0.2, hi=0.9):
    return torch.rand(shape[0], device=DEVICE) * (hi - lo) + lo


CASES = [
    Case("guided_x0", lambda sh: dict(c=_t(sh), u=_t(sh), x=_t(sh), a=_f(sh), s=_f(sh)),
         lambda c, u, x, a, s: guided_x0_reference(c, u, x, a, s, 7.5, "eps"),
         lambda c, u, x, a, s: ops.guided_x0(c, u, x, a, s, 7.5, "eps"), 4),
    Case("add_noise", lambda sh: dict(x=_t(sh), e=_t(sh), a=_f(sh), s=_f(sh)),
         lambda x, e, a, s: add_noise_reference(x, e, a, s), lambda x, e, a, s: ops.add_noise(x, e, a, s), 3),
    Case("add_fresh_noise", lambda sh: dict(x=_t(sh), a=_f(sh), s=_f(sh)),
         lambda x, a, s: add_fresh_noise_reference(x, a, s), lambda x, a, s: ops.add_fresh_noise(x, a, s), 3),
    Case("posterior_sample",
         lambda sh: dict(z=_t(sh), x=_t(sh), n=_t(sh), at=_f(sh, 0.3, 0.5), st=_f(sh, 0.85, 0.95),
                         as_=_f(sh, 0.6, 0.7), ss=_f(sh, 0.7, 0.8)),
         lambda z, x, n, at, st, as_, ss: posterior_sample_reference(z, x, at, st, as_, ss, n, 1.0),
         lambda z, x, n, at, st, as_, ss: ops.posterior_sample(z, x, at, st, as_, ss, n, 1.0), 4),
    Case("dmd_loss", lambda sh: dict(x=_t(sh, True), real=_t(sh), fake=_t(sh)),
         lambda x, real, fake: dmd_loss_reference(x, real, fake),
         lambda x, real, fake: ops.dmd_loss(x, real, fake), 4, backward="x"),
    Case("weighted_loss", lambda sh: dict(p=_t(sh, True), t=_t(sh), w=_f(sh)),
         lambda p, t, w: weighted_loss_reference(p, t, w, "l2"), lambda p, t, w: ops.weighted_loss(p, t, w, "l2"),
         3, backward="p"),
    Case("mm_generator_loss", lambda sh: dict(x=_t(sh, True), aux=_t(sh), teacher=_t(sh), w=_f(sh)),
         lambda x, aux, teacher, w: mm_generator_loss_reference(x, aux, teacher, w),
         lambda x, aux, teacher, w: ops.mm_generator_loss(x, aux, teacher, w), 4, backward="x"),
]

_compiled: dict[str, Callable] = {}


def _implementation(case: Case, variant: str) -> Callable:
    if variant == "eager":
        return case.eager
    if variant == "fused":
        return case.fused
    if case.name not in _compiled:
        _compiled[case.name] = torch.compile(case.eager, dynamic=False)
    return _compiled[case.name]


@pytest.mark.parametrize("variant", ["eager", "compiled", "fused"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel(benchmark, bandwidth, device_sync, case, size, variant, monkeypatch):
    if variant == "fused":
        if DEVICE != "cuda":
            pytest.skip("fused Triton kernels run on CUDA; on CPU core.ops runs the torch reference (the eager row)")
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("TRITON_INTERPRET=1 is set: the kernels would run in the interpreter")
        monkeypatch.setenv("FEWSTEP_KERNELS", "triton")
    else:
        monkeypatch.setenv("FEWSTEP_KERNELS", "torch")  # `compiled` traces the reference either way
    shape = SIZES[size]
    torch.manual_seed(0)
    inputs = case.inputs(shape)
    fn, wait = _implementation(case, variant), device_sync(DEVICE)
    leaf = inputs.get(case.backward) if case.backward else None

    def run():
        out = fn(**inputs)
        if leaf is not None:
            out.backward()
            leaf.grad = None
        wait()

    for _ in range(3):  # warm up: compilation, autotuning caches, allocator
        run()
    numel = torch.Size(shape).numel()
    benchmark.group = f"{case.name}-{size}"
    bandwidth.describe(nbytes=case.tensors_moved * numel * 4, variant=variant, op=case.name, shape=list(shape),
                       device=DEVICE, mode="forward+backward" if leaf is not None else "forward")
    benchmark(run)
    bandwidth.measured()
