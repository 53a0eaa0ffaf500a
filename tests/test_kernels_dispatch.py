"""The kernels' plumbing: the backend choice, the eager shortcuts around the custom-op dispatcher, the custom
ops against their fakes (torch.library.opcheck), gradient contracts, and torch.compile (set-up:
tests/kernel_checks.py; the kernels' values: tests/test_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

# first: it sets TRITON_INTERPRET before triton is imported
from tests.kernel_checks import DEVICE, FRESH_PROCESS_NEEDED, factors, kernels, make, run_in_fresh_process
from core import ops
from core.kernels import _triton

if _triton.AVAILABLE:
    from core.kernels import add_noise as k_noise


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("FEWSTEP_KERNELS", "triton")


# --------------------------------------------------------------------------- dispatch


@kernels
def test_forced_triton_runs_the_kernels(monkeypatch):
    calls = []
    launch = k_noise.launch
    monkeypatch.setattr(k_noise, "launch", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    x = make((2, 3), torch.float32)
    ops.add_noise(x, x, 0.5, 0.5)
    assert calls == [1]
    ops.add_noise(x.double(), x.double(), 0.5, 0.5)  # float64 is not a kernel dtype: the reference runs
    monkeypatch.setenv("FEWSTEP_KERNELS", "torch")
    ops.add_noise(x, x, 0.5, 0.5)
    assert calls == [1]


@kernels
@pytest.mark.parametrize("op", ["add_noise", "guided_x0", "dmd_loss", "posterior_sample", "weighted_loss",
                                "mm_generator_loss"])
def test_eager_entry_points_equal_the_custom_op(op):
    """Eager calls skip the custom-op dispatcher (the launcher without autograd, an autograd.Function with
    it); both give the custom op's forward and gradient exactly."""
    x, y, z = (make((3, 4, 5), torch.float32) for _ in range(3))
    a, s = factors(3, 0.2, 0.9).float(), factors(3, 0.2, 0.9).float()
    run = {"add_noise": lambda v: ops.add_noise(v, y, a, s),
           "guided_x0": lambda v: ops.guided_x0(v, y, z, a, s, 3.0, "v"),
           "dmd_loss": lambda v: ops.dmd_loss(v, y, z),
           "posterior_sample": lambda v: ops.posterior_sample(v, y, a, s, a * 0 + 0.95, s * 0.5, z),
           "weighted_loss": lambda v: ops.weighted_loss(v, y, a, "l1"),
           "mm_generator_loss": lambda v: ops.mm_generator_loss(v, y, z, a)}[op]

    def custom_op_calls(v, compiled=False):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = (torch.compile(run, backend="aot_eager", fullgraph=True) if compiled else run)(v)
            if v.requires_grad:
                out.backward(torch.ones_like(out))
        return out.detach(), [e.name for e in prof.events() if e.name.startswith("fewstep::")]

    no_grad, calls = custom_op_calls(x)
    assert not calls, f"eager call without autograd went through the dispatcher: {calls}"
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, calls = custom_op_calls(xe)
    assert not calls, f"eager call with autograd went through the dispatcher: {calls}"
    torch._dynamo.reset()
    through_op, calls = custom_op_calls(xc, compiled=True)
    assert calls, "under torch.compile the custom op did not run"
    assert torch.equal(no_grad, eager) and torch.equal(eager, through_op)
    assert torch.equal(xe.grad, xc.grad)


# --------------------------------------------------------------------------- torch.library and torch.compile


def _opcheck_cases():
    x, y, z = (make((3, 4, 5), torch.float32) for _ in range(3))
    perm = make((3, 5, 4), torch.float32).transpose(1, 2)  # non-contiguous layout
    b = make((3, 4, 5), torch.bfloat16)
    a, s = factors(3, 0.2, 1.0).float(), factors(3, 0.2, 1.0).float()
    one = torch.tensor([0.5], device=DEVICE)
    return {
        "add_noise": (torch.ops.fewstep.add_noise, [(x, y, a, s), (perm, b, one, s[:1])]),
        "add_fresh_noise": (torch.ops.fewstep.add_fresh_noise, [(x, a, s, 7), (b, one, one, 3)]),
        "guided_x0": (torch.ops.fewstep.guided_x0, [(x, y, z, a, s, 2.0, "v", "x0"),
                                                    (perm, None, z, a, s, 1.0, "eps", "score")]),
        "dmd_gradient_loss": (torch.ops.fewstep.dmd_gradient_loss, [(x, y, z), (perm, b.float(), z)]),
        "posterior_sample": (torch.ops.fewstep.posterior_sample, [(x, y, a, s, a * 0 + 0.9, s * 0.5, z, 1.0),
                                                                  (perm, y, a, s, a, s * 0.5, None, 0.0)]),
        "weighted_loss": (torch.ops.fewstep.weighted_loss, [(x, y, a, "l2"), (perm, b, None, "l1")]),
        "mm_generator_loss": (torch.ops.fewstep.mm_generator_loss, [(x, y, z, a), (perm, y, b, None)]),
    }


@kernels
@pytest.mark.parametrize("op", ["add_noise", "add_fresh_noise", "guided_x0", "dmd_gradient_loss",
                                "posterior_sample", "weighted_loss", "mm_generator_loss"])
def test_opcheck(op):
    fn, cases = _opcheck_cases()[op]
    for args in cases:
        args = tuple(t.clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) and t.ndim > 1
                     else t for t in args)
        torch.library.opcheck(fn.default, args)


@kernels
@pytest.mark.parametrize("op", ["guided_x0_backward", "posterior_sample_backward"])
@pytest.mark.parametrize("has_optional", [True, False])
def test_backward_ops_match_their_fakes(op, has_optional):
    """Without the optional input (unconditional prediction, noise) its gradient is an empty placeholder, as
    the fake (what torch.compile plans with) says."""
    grad, a, s = make((3, 4, 5), torch.float32), factors(3, 0.2, 1.0).float(), factors(3, 0.2, 1.0).float()
    args = {"guided_x0_backward": (grad, a, s, 2.0, has_optional, "v", "x0"),
            "posterior_sample_backward": (grad, a, s, a * 0 + 0.95, s * 0.5, 1.0, has_optional)}[op]
    torch.library.opcheck(getattr(torch.ops.fewstep, op).default, args)


@kernels
def test_posterior_sample_gives_the_unused_noise_no_gradient():
    """At eta = 0 the noise is not used: no gradient, as in the reference (not a zero one)."""
    z, x0 = make((3, 5), torch.float32).requires_grad_(), make((3, 5), torch.float32)
    noise = make((3, 5), torch.float32).requires_grad_()
    a, s = factors(3, 0.2, 1.0).float(), factors(3, 0.2, 1.0).float()
    ops.posterior_sample(z, x0, a, s, a * 0 + 0.95, s * 0.5, noise, 0.0).sum().backward()
    assert noise.grad is None and z.grad is not None


@kernels
def test_dmd_gradient_dtype_does_not_follow_torchs_default_dtype():
    x, real, fake = (make((3, 5), torch.float32) for _ in range(3))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert ops.dmd_gradient(x, real, fake).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


def _all_ops(x, y, z, a, s):
    """Every op in one graph (only differentiable paths contribute to the scalar)."""
    x_t = ops.add_noise(x, y, a, s)
    x0 = ops.guided_x0(x_t, z, x_t, a, s, 2.0, "eps")
    z_s = ops.posterior_sample(x_t, x0, a, s, a * 0 + 0.95, s * 0.5, y, 1.0)
    return (ops.weighted_loss(z_s, y, a, "l2") + ops.weighted_loss(x0, z, None, "l1") + ops.dmd_loss(x, y, z)
            + ops.mm_generator_loss(x, y, z, a) + ops.guided_score(x, None, z, a, s, 1.0, "v").mean())


@kernels
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_run_inside_torch_compile(backend):
    """fullgraph=True: dispatch and the opaque custom ops trace without graph breaks; forward and gradients
    equal the eager Triton path."""
    torch._dynamo.reset()
    x, y, z = (make((2, 3, 6, 5), torch.float32) for _ in range(3))
    a, s = factors(2, 0.3, 0.9).float(), factors(2, 0.3, 0.9).float()
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = _all_ops(xe, y, z, a, s)
    compiled = torch.compile(_all_ops, fullgraph=True, backend=backend)(xc, y, z, a, s)
    eager.backward()
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-6)
    assert torch.allclose(xc.grad, xe.grad, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- fallback


def test_triton_is_installed():
    """The dev extra installs triton; without it every kernel test above would skip, so say so loudly."""
    assert _triton.AVAILABLE, "triton is not importable: pip install -e '.[dev]' (make setup) installs it"


if FRESH_PROCESS_NEEDED:  # collected only when the tests above cannot run in this process

    def test_suite_in_a_fresh_process():
        run_in_fresh_process(__file__)
