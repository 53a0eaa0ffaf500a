"""The fused Triton kernels against float64 references: forward and gradients, odd and even shapes, mixed
precisions (set-up and the interpreter/compiler choice: tests/kernel_checks.py; dispatch, the custom ops and
torch.compile: tests/test_kernels_dispatch.py).
"""

from __future__ import annotations

import pytest
import torch

# first: it sets TRITON_INTERPRET before triton is imported
from tests.kernel_checks import (DEVICE, DTYPES, FRESH_PROCESS_NEEDED, SHAPES, assert_close, factors, grads_match,
                                 kernels, make, run_in_fresh_process)
from core import ops
from core.kernels import _triton

if _triton.AVAILABLE:
    from core.kernels import add_noise as k_noise
    from core.kernels import dmd as k_dmd
    from core.kernels import guided_x0 as k_guided
    from core.kernels import mm_loss as k_mm
    from core.kernels import posterior as k_post
    from core.kernels import weighted_loss as k_wl


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


if FRESH_PROCESS_NEEDED:  # collected only when the tests above cannot run in this process

    def test_suite_in_a_fresh_process():
        run_in_fresh_process(__file__)
