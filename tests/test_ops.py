"""core.ops on the torch path against closed forms, and the dispatch rule (FEWSTEP_KERNELS).

The Triton kernels are checked against these same references in tests/test_kernels.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from core import ops
from core.errors import UsageError
from core.kernels import dispatch


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FEWSTEP_KERNELS", "torch")


def vp(t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def test_add_noise_broadcasts_per_sample_factors():
    x0, eps = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    a, s = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64), 0.3
    x_t = ops.add_noise(x0, eps, a, s)
    for b in range(3):
        assert torch.allclose(x_t[b], a[b] * x0[b] + 0.3 * eps[b])


def test_add_fresh_noise_returns_the_noise_it_used():
    x0 = torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(3)
    x_t, eps = ops.add_fresh_noise(x0, 0.6, 0.8)
    assert torch.allclose(x_t, 0.6 * x0 + 0.8 * eps)
    torch.manual_seed(3)
    assert torch.equal(ops.add_fresh_noise(x0, 0.6, 0.8)[1], eps)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
def test_guided_x0_recovers_x0_and_score(prediction):
    """With x_t = a x0 + s eps and the exact network output of each kind, guided_x0 returns x0 and
    guided_score returns -eps / s (Tweedie), for any guidance scale when cond == uncond."""
    b = 4
    x0, eps = torch.randn(b, 3, 5, dtype=torch.float64), torch.randn(b, 3, 5, dtype=torch.float64)
    t = torch.rand(b, dtype=torch.float64) * 0.8 + 0.1
    if prediction == "flow":
        a, s = 1 - t, t
    else:
        a, s = vp(t)
    ab, sb = a[:, None, None], s[:, None, None]
    x_t = ab * x0 + sb * eps
    out = {"eps": eps, "x0": x0, "v": ab * eps - sb * x0, "flow": eps - x0}[prediction]
    for scale in (1.0, 7.5):
        assert torch.allclose(ops.guided_x0(out, out.clone(), x_t, a, s, scale, prediction), x0, atol=1e-12)
        assert torch.allclose(ops.guided_score(out, out.clone(), x_t, a, s, scale, prediction), -eps / sb,
                              atol=1e-10)


def test_guided_x0_is_classifier_free_guidance():
    """x0 of u + w (c - u) equals x0_u + w (x0_c - x0_u) (conversions are affine in the output)."""
    c, u, x_t = (torch.randn(2, 6, dtype=torch.float64) for _ in range(3))
    a, s = vp(torch.tensor([0.3, 0.7]))
    xc, xu = ops.guided_x0(c, None, x_t, a, s, 1.0, "eps"), ops.guided_x0(u, None, x_t, a, s, 1.0, "eps")
    assert torch.allclose(ops.guided_x0(c, u, x_t, a, s, 4.0, "eps"), xu + 4.0 * (xc - xu))


def test_dmd_gradient_by_hand():
    x = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    real = torch.tensor([[0.0, 1.0], [2.0, 2.0]])  # sample 1: x == x0_real, normaliser 0
    fake = torch.tensor([[2.0, 2.0], [5.0, 1.0]])
    g = ops.dmd_gradient(x, real, fake)
    assert torch.allclose(g[0], torch.tensor([2 / 1.5, 1 / 1.5]))  # N = (1 + 2) / 2
    assert (g[1] == 0).all()  # 3/0, -1/0 are non-finite: zeroed


def test_dmd_loss_gradient_is_g_over_numel():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    loss = ops.dmd_loss(x, real, fake)
    g = ops.dmd_gradient(x, real, fake)
    assert torch.allclose(loss, 0.5 * g.square().mean())
    loss.backward()
    assert torch.allclose(x.grad, g / x.numel())
    norm = (x.detach() - real).abs().mean(dim=(1, 2), keepdim=True)
    assert torch.allclose(g, (fake - real) / norm)


def test_posterior_sample_eta1_is_the_gaussian_posterior():
    """q(z_s | z_t, x) for the forward process (Kingma et al. 2021, VDM eq. 30-32): with
    a_ts = a_t / a_s and s2_ts = s_t^2 - a_ts^2 s_s^2, mean = a_ts s_s^2 / s_t^2 z_t + a_s s2_ts / s_t^2 x
    and variance s2_ts s_s^2 / s_t^2."""
    z_t, x0 = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    at, st = vp(torch.tensor([0.9, 0.6, 0.5]))
    as_, ss = vp(torch.tensor([0.7, 0.2, 0.45]))
    a_ts = at / as_
    s2_ts = st**2 - a_ts**2 * ss**2
    mean = (a_ts * ss**2 / st**2)[:, None] * z_t + (as_ * s2_ts / st**2)[:, None] * x0
    std = (s2_ts * ss**2 / st**2).sqrt()[:, None]
    assert torch.allclose(ops.posterior_sample(z_t, x0, at, st, as_, ss, None), mean)
    noise = torch.randn(3, 7, dtype=torch.float64)
    assert torch.allclose(ops.posterior_sample(z_t, x0, at, st, as_, ss, noise), mean + std * noise)


def test_posterior_sample_eta0_is_ddim():
    z_t, x0 = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    at, st = vp(torch.tensor([0.8, 0.5]))
    as_, ss = vp(torch.tensor([0.3, 0.1]))
    eps_hat = (z_t - at[:, None] * x0) / st[:, None]
    ddim = as_[:, None] * x0 + ss[:, None] * eps_hat
    assert torch.allclose(ops.posterior_sample(z_t, x0, at, st, as_, ss, torch.randn(2, 5), eta=0.0), ddim)


def test_weighted_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    w = torch.tensor([2.0, 0.5])
    assert torch.allclose(ops.weighted_loss(pred, target, w, "l2"), torch.tensor((2 * 2.5 + 0.5 * 5.0) / 2))
    assert torch.allclose(ops.weighted_loss(pred, target, w, "l1"), torch.tensor((2 * 1.5 + 0.5 * 2.0) / 2))
    assert torch.allclose(ops.weighted_loss(pred, target, None, "l2"), torch.tensor((2.5 + 5.0) / 2))


def test_mm_generator_loss_value_and_gradient():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    aux, teacher = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    loss = ops.mm_generator_loss(x, aux, teacher, w)
    assert torch.allclose(loss, (w * (x * (aux - teacher)).mean(1)).mean())
    loss.backward()
    assert torch.allclose(x.grad, w[:, None] * (aux - teacher) / 12)


# --------------------------------------------------------------------------- dispatch


def test_factors_reach_the_kernels_contiguous():
    """What the kernels index as b * stride (stride 0 or 1): expanded 0-d and strided views are copied,
    numbers and 0-d tensors become one value, a mix of 1 and B values is expanded to B, None stays."""
    like = torch.zeros(3, 2)
    table = torch.arange(12.0).reshape(3, 4)
    expanded = torch.tensor(0.5).expand(3)
    a, s, w, none = dispatch.factors(like, (expanded, table[:, 1], 2, None))
    assert none is None
    for f, values in ((a, [0.5] * 3), (s, [1.0, 5.0, 9.0]), (w, [2.0] * 3)):
        assert f.shape == (3,) and f.stride() == (1,) and f.tolist() == values
    one, = dispatch.factors(like, (torch.tensor(7),))
    assert one.shape == (1,) and one.dtype == torch.float32 and one.item() == 7.0
    four_d, = dispatch.factors(like, (table[:, 2:3, None, None],))
    assert four_d.tolist() == [2.0, 6.0, 10.0] and four_d.is_contiguous()


def test_dmd_gradient_of_fp16_inputs_is_fp32_and_finite():
    """|g| ~ 1e5 overflows fp16; g and the loss are fp32, the gradient reaching x is g / numel in fp16."""
    real = torch.zeros(2, 3, 4, dtype=torch.float16)
    x = torch.full_like(real, 1e-3).requires_grad_()
    fake = torch.full_like(real, 100.0)
    g = ops.dmd_gradient(x, real, fake)
    ref = (fake.double() - real.double()) / (x.detach().double() - real.double()).abs().mean()
    assert g.dtype == torch.float32 and torch.allclose(g.double(), ref, rtol=1e-6)
    loss = ops.dmd_loss(x, real, fake)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.allclose(loss.double(), 0.5 * ref.square().mean(), rtol=1e-5)
    loss.backward()
    assert x.grad.dtype == torch.float16 and torch.allclose(x.grad.double(), ref / x.numel(), rtol=2e-3)


def test_unknown_backend_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("FEWSTEP_KERNELS", "cuda")
    with pytest.raises(UsageError, match="FEWSTEP_KERNELS='cuda'.*auto, torch, triton"):
        ops.add_noise(torch.ones(2, 2), torch.ones(2, 2), 0.5, 0.5)


def test_auto_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("FEWSTEP_KERNELS", "auto")
    assert not dispatch.use_triton((torch.ones(2, 3),), (0.5,))


def test_forced_triton_without_a_way_to_run_it_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("FEWSTEP_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: False)
    with pytest.raises(UsageError, match="triton is not installed"):
        ops.add_noise(torch.ones(2, 2), torch.ones(2, 2), 0.5, 0.5)
    if dispatch.importlib.util.find_spec("triton") is None:
        return
    from core.kernels import _triton

    monkeypatch.setattr(dispatch, "_triton_installed", lambda: True)
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    with pytest.raises(UsageError, match="TRITON_INTERPRET=1"):
        ops.add_noise(torch.ones(2, 2), torch.ones(2, 2), 0.5, 0.5)


def test_inputs_the_kernels_do_not_cover_take_the_reference(monkeypatch):
    """float64, mismatched shapes, factors needing gradients, empty tensors and torch.func transforms run
    the reference even when Triton is forced (so no Triton is needed for them)."""
    monkeypatch.setenv("FEWSTEP_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: False)  # would raise if Triton were chosen
    x = torch.randn(2, 3)
    assert torch.allclose(ops.add_noise(x.double(), x.double(), 0.5, 0.5), x.double())
    assert ops.add_noise(x, x[:1], 0.5, 0.5).shape == (2, 3)
    ops.add_noise(x, x, torch.tensor([0.5, 0.5], requires_grad=True), 0.5)
    ops.add_noise(x[:0], x[:0], 0.5, 0.5)
    primal, tangent = torch.func.jvp(lambda v: ops.add_noise(v, x, 0.25, 1.0), (x,), (torch.ones_like(x),))
    assert torch.allclose(tangent, torch.full_like(x, 0.25))
    assert torch.allclose(torch.func.vmap(lambda v: ops.weighted_loss(v[None], v[None]))(x), torch.zeros(2))


def test_everything_but_the_kernels_works_without_triton():
    """With triton not importable the kernel modules still import, ops run the reference, and forcing
    Triton is a one-line usage error."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import os, torch\n"
        "from core import ops\n"
        "from core.errors import UsageError\n"
        "x = torch.ones(2, 3)\n"
        "assert torch.equal(ops.add_noise(x, x, 0.5, 0.25), x * 0.75)\n"
        "assert ops.weighted_loss(x, x * 0) == 1\n"
        "os.environ['FEWSTEP_KERNELS'] = 'triton'\n"
        "try:\n"
        "    ops.add_noise(x, x, 0.5, 0.25)\n"
        "except UsageError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FEWSTEP_KERNELS"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton is not installed" in proc.stdout
