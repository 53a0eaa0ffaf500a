"""The fused Triton kernels against float64 references: forward and gradients, odd and even shapes.

On CPU they run under the Triton interpreter. Triton picks interpreter or compiler when ``@triton.jit``
decorates, so TRITON_INTERPRET=1 is set here, at collection, before this module imports triton; if
something in this process imported triton earlier, the in-process tests skip and
``test_suite_in_a_fresh_process`` runs this file in a clean subprocess instead.
``FEWSTEP_TEST_DEVICE=cuda`` runs the same file on a GPU with compiled kernels (tests/test_kernels_gpu.py).
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

from core import ops  # noqa: E402
from core.kernels import _triton  # noqa: E402

if _triton.AVAILABLE:
    from core.kernels import add_noise as k_noise  # noqa: E402
    from core.kernels import dmd as k_dmd  # noqa: E402
    from core.kernels import guided_x0 as k_guided  # noqa: E402
    from core.kernels import mm_loss as k_mm  # noqa: E402
    from core.kernels import posterior as k_post  # noqa: E402
    from core.kernels import weighted_loss as k_wl  # noqa: E402

IN_PROCESS = _triton.AVAILABLE and (_triton.interpreting() if DEVICE == "cpu" else torch.cuda.is_available())
REASON = ("triton not installed" if not _triton.AVAILABLE else
          "triton was imported before TRITON_INTERPRET=1 was set; test_suite_in_a_fresh_process covers this file"
          if DEVICE == "cpu" else "no CUDA device")
kernels = pytest.mark.skipif(not IN_PROCESS, reason=REASON)

SHAPES = [(3, 5, 7, 9), (2, 4, 16, 16), (5, 3)]  # odd D=315, even D=1024, tiny D=3
DTYPES = [torch.float32, torch.bfloat16]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("FEWSTEP_KERNELS", "triton")


@pytest.fixture(params=[1024, 64], ids=["block1024", "block64"])
def block(request, monkeypatch):
    """64-element blocks and at most 4 chunks per sample exercise several programs and the chunk loop."""
    monkeypatch.setattr(_triton, "BLOCK", request.param)
    if request.param == 64:
        monkeypatch.setattr(_triton, "MAX_CHUNKS", 4)
    return request.param


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


# --------------------------------------------------------------------------- forward noising


@kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise(shape, dtype, block):
    a, s = factors(shape[0], 0.1, 1.0), factors(shape[0], 0.1, 2.0)
    grads_match(lambda x, e: ops.add_noise(x, e, a.float(), s.float()),
                lambda x, e: k_noise.add_noise_reference(x, e, a.float().double(), s.float().double()),
                [make(shape, dtype), make(shape, dtype)], dtype, differentiable=(0, 1))


@kernels
@pytest.mark.parametrize("alpha", [0.7, "0-d", "[B] float64"])
def test_add_noise_factor_forms(alpha):
    """Scalars, 0-d and float64 [B] factors broadcast like the reference."""
    x, e = make((3, 4, 5), torch.float32), make((3, 4, 5), torch.float32)
    a = {"0-d": torch.tensor(0.7), "[B] float64": factors(3, 0.1, 1.0)}.get(alpha, alpha)
    ref = k_noise.add_noise_reference(x.double(), e.double(), torch.as_tensor(a).double(), 0.5)
    assert_close(ops.add_noise(x, e, a, 0.5), ref, torch.float32)


@kernels
def test_add_noise_gradients_keep_each_inputs_precision():
    """float32 data with bfloat16 noise: d/dx0 = alpha g rounded once to float32, d/deps = sigma g to bfloat16."""
    a, s = factors(3, 0.1, 1.0).float(), factors(3, 0.1, 2.0).float()
    grads_match(lambda x, e: ops.add_noise(x, e, a, s),
                lambda x, e: k_noise.add_noise_reference(x, e, a.double(), s.double()),
                [make((3, 4, 5), torch.float32), make((3, 4, 5), torch.bfloat16)], torch.float32, differentiable=(0, 1))


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_fresh_noise_is_standard_normal_and_consistent(dtype):
    shape = (4, 3, 40, 41)  # 19680 elements
    x = make(shape, dtype)
    a, s = factors(4, 0.2, 1.0).float(), factors(4, 0.2, 1.0).float()
    torch.manual_seed(1)
    x_t, eps = ops.add_fresh_noise(x, a, s)
    assert eps.dtype == dtype and x_t.dtype == dtype
    assert_close(x_t, k_noise.add_noise_reference(x.double(), eps.double(), a.double(), s.double()), dtype)
    e = eps.double().flatten()
    n = e.numel()
    assert abs(e.mean()) < 4 / n**0.5 and abs(e.std() - 1) < 4 * (0.5 / n) ** 0.5
    inside = (e.abs() < 1).double().mean()  # P(|N(0,1)| < 1) = 0.6827
    assert abs(inside - 0.6827) < 4 * (0.6827 * 0.3173 / n) ** 0.5
    assert abs(torch.corrcoef(torch.stack([e[:-1], e[1:]]))[0, 1]) < 4 / n**0.5  # neighbours independent
    torch.manual_seed(1)
    assert torch.equal(ops.add_fresh_noise(x, a, s)[1], eps)  # torch.manual_seed makes it reproducible
    assert not torch.equal(ops.add_fresh_noise(x, a, s)[1], eps)


@kernels
def test_add_fresh_noise_seeds_from_the_given_generator():
    x, a = make((2, 3, 8), torch.float32), factors(2, 0.2, 1.0).float()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    eps = ops.add_fresh_noise(x, a, 0.5, torch.Generator().manual_seed(3))[1]
    assert torch.equal(torch.get_rng_state(), state)  # the default generator is left alone
    assert torch.equal(ops.add_fresh_noise(x, a, 0.5, torch.Generator().manual_seed(3))[1], eps)
    assert not torch.equal(ops.add_fresh_noise(x, a, 0.5, torch.Generator().manual_seed(4))[1], eps)


@kernels
def test_add_fresh_noise_does_not_depend_on_the_launch_grid(monkeypatch):
    """Philox is keyed by (seed, element index), so the block size does not change the draw."""
    x = make((3, 5, 7, 9), torch.float32)
    torch.manual_seed(2)
    eps = ops.add_fresh_noise(x, 0.5, 0.5)[1]
    monkeypatch.setattr(_triton, "BLOCK", 64)
    torch.manual_seed(2)
    assert torch.equal(ops.add_fresh_noise(x, 0.5, 0.5)[1], eps)


@kernels
def test_add_fresh_noise_gradient():
    x = make((3, 5, 7), torch.float32).requires_grad_()
    a = factors(3, 0.2, 1.0).float()
    x_t, eps = ops.add_fresh_noise(x, a, 0.5)
    assert not eps.requires_grad
    up = make(x_t.shape, torch.float32)
    x_t.backward(up)
    assert_close(x.grad, up.double() * a.double()[:, None, None], torch.float32)


# --------------------------------------------------------------------------- guided x0 / score


@kernels
@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
@pytest.mark.parametrize("output", ["x0", "score"])
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "cond-only"])
def test_guided_x0_all_predictions(prediction, output, guided):
    shape = SHAPES[0]
    a, s = factors(shape[0], 0.2, 1.0).float(), factors(shape[0], 0.2, 1.0).float()
    fn = ops.guided_x0 if output == "x0" else ops.guided_score

    def ref(c, u, x):
        return k_guided.guided_x0_reference(c, u if guided else None, x, a.double(), s.double(), 4.5,
                                            prediction, output)

    grads_match(lambda c, u, x: fn(c, u if guided else None, x, a, s, 4.5, prediction), ref,
                [make(shape, torch.float32) for _ in range(3)], torch.float32,
                differentiable=(0, 1, 2) if guided else (0, 2))


@kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_guided_x0_shapes_dtypes(shape, dtype, block):
    a, s = factors(shape[0], 0.2, 1.0).float(), factors(shape[0], 0.2, 1.0).float()
    grads_match(lambda c, u, x: ops.guided_x0(c, u, x, a, s, 3.0, "eps"),
                lambda c, u, x: k_guided.guided_x0_reference(c, u, x, a.double(), s.double(), 3.0, "eps"),
                [make(shape, dtype) for _ in range(3)], dtype, differentiable=(0, 1, 2))


@kernels
def test_guided_x0_gradients_keep_each_inputs_precision():
    """float32 predictions with a bfloat16 x_t: each gradient is rounded once, to its own input's dtype."""
    a, s = factors(3, 0.2, 1.0).float(), factors(3, 0.2, 1.0).float()
    grads_match(lambda c, u, x: ops.guided_x0(c, u, x, a, s, 3.0, "eps"),
                lambda c, u, x: k_guided.guided_x0_reference(c, u, x, a.double(), s.double(), 3.0, "eps"),
                [make((3, 5), torch.float32), make((3, 5), torch.float32), make((3, 5), torch.bfloat16)],
                torch.float32, differentiable=(0, 1, 2))


# --------------------------------------------------------------------------- DMD2 gradient and loss


@kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dmd_gradient_and_loss(shape, dtype, block):
    x, real, fake = (make(shape, dtype) for _ in range(3))
    ref_g = k_dmd.dmd_gradient_reference(x.double(), real.double(), fake.double())
    assert_close(ops.dmd_gradient(x, real, fake), ref_g, torch.float32, "g")  # g is fp32 for every input dtype
    grads_match(lambda x_: ops.dmd_loss(x_, real, fake),
                lambda x_: k_dmd.dmd_loss_reference(x_, real.double(), fake.double()), [x], dtype,
                differentiable=(0,), out_dtype=torch.float32)


@kernels
def test_dmd_nan_guard(block):
    """A sample with x == x0_real (normaliser 0) and non-finite teacher outputs give g = 0 there, like the
    reference's nan_to_num; the other samples are untouched."""
    x, real, fake = (make((3, 4, 9, 9), torch.float32) for _ in range(3))
    x[1] = real[1]
    fake[2, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    g = ops.dmd_gradient(x, real, fake)
    ref = k_dmd.dmd_gradient_reference(x.double(), real.double(), fake.double())
    assert torch.isfinite(g).all() and (g[1] == 0).all() and (g[2, 0, 0, :3] == 0).all()
    assert_close(g, ref, torch.float32)
    loss = ops.dmd_loss(x, real, fake)
    assert torch.isfinite(loss)
    assert_close(loss, k_dmd.dmd_loss_reference(x.double(), real.double(), fake.double()), torch.float32)


@kernels
def test_dmd_loss_backward_is_g_over_numel():
    """The backward hands back g / numel exactly (no x - (x - g) rounding as in the eager MSE trick)."""
    x, real, fake = (make((2, 3, 8, 8), torch.float32) for _ in range(3))
    x = (x * 1e4).requires_grad_()  # large x: the eager form loses g's low bits in x - (x - g)
    ops.dmd_loss(x, real, fake).backward()
    g = ops.dmd_gradient(x, real, fake)
    assert torch.equal(x.grad, g * (1.0 / x.numel()))


@kernels
def test_dmd_fp16_does_not_overflow(block):
    """fp16 inputs with x close to x0_real: g = (x0_fake - x0_real) / N_b is ~1e5, beyond fp16's 65504, and
    0.5 mean(g^2) ~ 1e9. g and the loss stay finite in fp32 and match float64; the gradient reaching x,
    g / numel, is representable in fp16 and matches too."""
    shape = (2, 3, 5, 7)
    real = make(shape, torch.float16)
    x = (real.double() + 1e-3).to(torch.float16)  # |x - x0_real| ~ 1e-3 (fp16 rounding of real + 1e-3)
    fake = (real.double() + 100.0).to(torch.float16)
    g = ops.dmd_gradient(x, real, fake)
    ref = k_dmd.dmd_gradient_reference(x.double(), real.double(), fake.double())
    assert ref.abs().max() > 65504  # the case would overflow an fp16 g
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert_close(g, ref, torch.float32)
    assert_close(ops.dmd_loss(x, real, fake), k_dmd.dmd_loss_reference(x.double(), real.double(),
                                                                        fake.double()), torch.float32, "loss")
    xg = x.clone().requires_grad_()
    loss = ops.dmd_loss(xg, real, fake)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert xg.grad.dtype == torch.float16 and torch.isfinite(xg.grad).all()
    assert_close(xg.grad, ref / x.numel(), torch.float16)


# --------------------------------------------------------------------------- posterior sample


@kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta", [1.0, 0.3, 0.0])
def test_posterior_sample(shape, dtype, eta, block):
    b = shape[0]
    t = factors(b, 0.4, 0.95)
    s = t - factors(b, 0.05, 0.3)
    at, st = torch.cos(t * torch.pi / 2).float(), torch.sin(t * torch.pi / 2).float()  # VP cosine
    as_, ss = torch.cos(s * torch.pi / 2).float(), torch.sin(s * torch.pi / 2).float()
    f64 = [v.double() for v in (at, st, as_, ss)]
    grads_match(lambda z, x0, n: ops.posterior_sample(z, x0, at, st, as_, ss, n, eta),
                lambda z, x0, n: k_post.posterior_sample_reference(z, x0, *f64, n, eta),
                [make(shape, dtype) for _ in range(3)], dtype, differentiable=(0, 1, 2) if eta else (0, 1))


@kernels
@pytest.mark.parametrize("layout", ["expanded 0-d", "strided column", "[B, 1, 1] view"])
def test_factors_with_any_stride(layout, block):
    """Per-sample factors as views: an expanded 0-d tensor (stride 0, one element in memory), a column of a
    [B, K] tensor (stride K) and a [B, 1, 1] view, for every op that takes factors, against float64."""
    shape = (3, 4, 5, 7)
    table = factors(3 * 4, 0.2, 0.9).reshape(3, 4).float()  # columns: alpha, sigma, alpha_s, sigma_s
    if layout == "expanded 0-d":
        cols = [torch.tensor(v, device=DEVICE).expand(3) for v in (0.7, 0.6, 0.9, 0.3)]
    elif layout == "strided column":
        cols = [table[:, i] for i in range(4)]
        assert cols[0].stride(0) == 4
    else:
        cols = [table[:, i:i + 1, None] for i in range(4)]
    ref_cols = [c.double().reshape(-1).expand(3).contiguous() for c in cols]
    x, y, z = (make(shape, torch.float32) for _ in range(3))
    x64, y64, z64 = x.double(), y.double(), z.double()
    a, s, a_s, s_s = cols
    ra, rs, ras, rss = ref_cols
    assert_close(ops.add_noise(x, y, a, s), k_noise.add_noise_reference(x64, y64, ra, rs), torch.float32, "add")
    assert_close(ops.guided_x0(x, y, z, a, s, 2.0, "v"),
                 k_guided.guided_x0_reference(x64, y64, z64, ra, rs, 2.0, "v"), torch.float32, "guided")
    ref = k_post.posterior_sample_reference(x64, y64, ra * 0.5, rs, ras, rss * 0.5, z64, 1.0)
    assert_close(ops.posterior_sample(x, y, a * 0.5, s, a_s, s_s * 0.5, z), ref, torch.float32, "posterior")
    assert_close(ops.weighted_loss(x, y, s, "l2"), k_wl.weighted_loss_reference(x64, y64, rs, "l2"),
                 torch.float32, "weighted_loss")
    assert_close(ops.mm_generator_loss(x, y, z, a), k_mm.mm_generator_loss_reference(x64, y64, z64, ra),
                 torch.float32, "mm")
    torch.manual_seed(0)
    x_t, eps = ops.add_fresh_noise(x, a, s)
    assert_close(x_t, k_noise.add_noise_reference(x64, eps.double(), ra, rs), torch.float32, "fresh")


@kernels
def test_posterior_sample_without_noise_and_mixed_factors():
    """noise=None gives the posterior mean; scalar and [B] factors mix."""
    z, x0 = make((3, 2, 5), torch.float32), make((3, 2, 5), torch.float32)
    at = factors(3, 0.3, 0.6).float()
    ref = k_post.posterior_sample_reference(z.double(), x0.double(), at.double(), 0.8, 0.9, 0.4, None, 1.0)
    assert_close(ops.posterior_sample(z, x0, at, 0.8, 0.9, 0.4, None), ref, torch.float32)


@kernels
def test_posterior_sample_promotes_to_the_noises_dtype():
    """bfloat16 z_t and x0 with float32 noise: a float32 sample, as the reference's type promotion gives."""
    at, st, as_, ss = (factors(3, lo, hi).float() for lo, hi in ((0.3, 0.5), (0.8, 0.9), (0.8, 0.9), (0.3, 0.4)))
    grads_match(lambda z, x0, n: ops.posterior_sample(z, x0, at, st, as_, ss, n, 1.0),
                lambda z, x0, n: k_post.posterior_sample_reference(z, x0, *(v.double() for v in (at, st, as_, ss)), n),
                [make((3, 5), torch.bfloat16), make((3, 5), torch.bfloat16), make((3, 5), torch.float32)],
                torch.bfloat16, differentiable=(0, 1, 2), out_dtype=torch.float32)


# --------------------------------------------------------------------------- regression losses


@kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("weight", ["per-sample", "scalar", None])
def test_weighted_loss(shape, dtype, kind, weight, block):
    w = {"per-sample": factors(shape[0], 0.1, 3.0).float(), "scalar": 0.25, None: None}[weight]
    w64 = w.double() if isinstance(w, torch.Tensor) else w
    grads_match(lambda p, t: ops.weighted_loss(p, t, w, kind),
                lambda p, t: k_wl.weighted_loss_reference(p, t, w64, kind),
                [make(shape, dtype), make(shape, dtype)], dtype, differentiable=(0, 1))


@kernels
@pytest.mark.parametrize("trained", [0, 1])
def test_weighted_loss_gradient_reaches_only_the_input_that_asks(trained):
    """The usual case: the prediction trains and the target is fixed (or the other way round)."""
    w = factors(3, 0.1, 3.0).float()
    grads_match(lambda p, t: ops.weighted_loss(p, t, w, "l2"),
                lambda p, t: k_wl.weighted_loss_reference(p, t, w.double(), "l2"),
                [make((3, 5), torch.float32), make((3, 5), torch.float32)], torch.float32, differentiable=(trained,))


@kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_mm_generator_loss(shape, dtype, weighted, block):
    w = factors(shape[0], 0.1, 3.0).float() if weighted else None
    w64 = None if w is None else w.double()
    grads_match(lambda x, a, t: ops.mm_generator_loss(x, a, t, w),
                lambda x, a, t: k_mm.mm_generator_loss_reference(x, a, t, w64),
                [make(shape, dtype) for _ in range(3)], dtype, differentiable=(0,))


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


if not IN_PROCESS and _triton.AVAILABLE and DEVICE == "cpu":  # collected only when the tests above cannot run here

    def test_suite_in_a_fresh_process():
        env = {**os.environ, "TRITON_INTERPRET": "1", "FEWSTEP_TEST_DEVICE": "cpu"}
        env.pop("FEWSTEP_KERNELS", None)
        proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
                               "-p", "no:xdist"], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
