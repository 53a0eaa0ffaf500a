"""The kernels' torch references against formulas written out here in float64 (test_kernels.py checks the Triton
kernels against these references, so the references themselves must be right): the DDPM posterior q(z_s | z_t, x0)
of Ho et al. 2020 eq. 7 (generalised to any alpha, sigma), DDIM, the DMD2 normalised gradient, CFG, the losses."""

from __future__ import annotations

import pytest
import torch

from core.kernels.add_noise import add_fresh_noise_reference, add_noise_reference
from core.kernels.dmd import dmd_gradient_reference, dmd_loss_reference
from core.kernels.guided_x0 import guided_x0_reference
from core.kernels.mm_loss import mm_generator_loss_reference
from core.kernels.posterior import posterior_sample_reference
from core.kernels.weighted_loss import weighted_loss_reference

F64 = torch.float64


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_add_noise_references():
    x0, eps = _t(3, 2, 2), _t(3, 2, 2, seed=1)
    a, s = torch.tensor([0.9, 0.5, 1.0], dtype=F64), torch.tensor([0.2, 1.5, 3.0], dtype=F64)
    torch.testing.assert_close(add_noise_reference(x0, eps, a, s), a.view(3, 1, 1) * x0 + s.view(3, 1, 1) * eps)
    torch.testing.assert_close(add_noise_reference(x0, eps, 0.5, 2.0), 0.5 * x0 + 2.0 * eps)
    x32 = x0.float()
    xt, e = add_fresh_noise_reference(x32, a, s, generator=torch.Generator().manual_seed(5))
    expect_e = torch.randn(x32.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    assert e.dtype == xt.dtype == torch.float32
    torch.testing.assert_close(e, expect_e, rtol=0, atol=0)
    torch.testing.assert_close(xt, a.float().view(3, 1, 1) * x32 + s.float().view(3, 1, 1) * expect_e)


def test_dmd_gradient_is_normalised_by_the_per_sample_mean_abs_error():
    x, real, fake = _t(3, 4), _t(3, 4, seed=1), _t(3, 4, seed=2)
    g = dmd_gradient_reference(x.float(), real, fake)
    assert g.dtype == torch.float32
    norm = (x - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(g.double(), (fake - real) / norm, rtol=1e-6, atol=1e-6)
    assert dmd_gradient_reference(x.half(), real.half(), fake.half()).dtype == torch.float32
    assert dmd_gradient_reference(x, real, fake).dtype == F64
    # a sample whose generated x equals the real estimate has a zero norm: its gradient is 0, not nan/inf
    same = x.clone()
    same[1] = real[1]
    gz = dmd_gradient_reference(same, real, fake)
    assert torch.equal(gz[1], torch.zeros(4, dtype=F64)) and bool(gz.isfinite().all())
    fz = fake.clone()
    fz[1] = real[1]  # 0/0
    assert torch.equal(dmd_gradient_reference(same, real, fz)[1], torch.zeros(4, dtype=F64))
    neg = fake.clone()
    neg[1] = real[1] - 1  # -x/0
    assert torch.equal(dmd_gradient_reference(same, real, neg)[1], torch.zeros(4, dtype=F64))


def test_dmd_loss_value_and_gradient():
    x, real, fake = _t(3, 4).requires_grad_(), _t(3, 4, seed=1), _t(3, 4, seed=2)
    loss = dmd_loss_reference(x, real, fake)
    g = (fake - real) / (x.detach() - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(loss, 0.5 * (g**2).mean())
    loss.backward()
    torch.testing.assert_close(x.grad, g / x.numel())
    assert dmd_loss_reference(x.detach().half(), real.half(), fake.half()).dtype == torch.float32


@pytest.mark.parametrize("output", ["x0", "score"])
def test_guided_x0_reference_is_cfg_then_conversion(output):
    x_t, c, u = _t(3, 4), _t(3, 4, seed=1), _t(3, 4, seed=2)
    a, s = torch.tensor([0.8, 0.6, 1.0], dtype=F64), torch.tensor([0.6, 0.8, 2.0], dtype=F64)
    av, sv = a[:, None], s[:, None]
    eps = u + 3.0 * (c - u)
    x0 = (x_t - sv * eps) / av
    expect = x0 if output == "x0" else (av * x0 - x_t) / sv**2
    torch.testing.assert_close(guided_x0_reference(c, u, x_t, a, s, 3.0, "eps", output), expect)
    x0c = (x_t - sv * c) / av  # no unconditional prediction: the conditional one, unscaled
    torch.testing.assert_close(guided_x0_reference(c, None, x_t, a, s, 3.0, "eps"), x0c)
    torch.testing.assert_close(guided_x0_reference(c, u, x_t, a, s, 2.0, "x0"), u + 2.0 * (c - u))


def test_mm_generator_loss_reference():
    x, aux, teacher = _t(3, 2, 2).requires_grad_(), _t(3, 2, 2, seed=1).requires_grad_(), _t(3, 2, 2, seed=2)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    per = (x.detach() * (aux.detach() - teacher)).flatten(1).mean(1)
    torch.testing.assert_close(mm_generator_loss_reference(x, aux, teacher), per.mean())
    loss = mm_generator_loss_reference(x, aux, teacher, w)
    torch.testing.assert_close(loss, (w * per).mean())
    loss.backward()
    assert aux.grad is None  # the direction is a constant of the surrogate
    torch.testing.assert_close(x.grad, w.view(3, 1, 1) * (aux.detach() - teacher) / x.numel())
    for weight in ([1, 2, 3], w):  # the weight takes the loss's dtype (a float64 one does not promote it)
        assert mm_generator_loss_reference(x.detach().float(), aux.detach().float(), teacher.float(), weight).dtype \
            == torch.float32


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_weighted_loss_reference(kind):
    p, t = _t(4, 3), _t(4, 3, seed=1)
    w = torch.tensor([1.0, 0.0, 3.0, 0.5], dtype=F64)
    per = ((p - t) ** 2 if kind == "l2" else (p - t).abs()).mean(1)
    torch.testing.assert_close(weighted_loss_reference(p, t, w, kind), (w * per).mean())
    torch.testing.assert_close(weighted_loss_reference(p, t, None, kind), per.mean())
    assert weighted_loss_reference(p.float(), t.float(), [1, 2, 3, 4], kind).dtype == torch.float32
    torch.testing.assert_close(weighted_loss_reference(p, t), ((p - t) ** 2).mean())  # l2 by default


def _posterior_case():
    z_t, x0, noise = _t(3, 4), _t(3, 4, seed=1), _t(3, 4, seed=2)
    at, st = torch.tensor([0.6, 0.3, 1.0], dtype=F64), torch.tensor([0.8, 0.95, 2.0], dtype=F64)
    as_, ss = torch.tensor([0.9, 0.7, 1.0], dtype=F64), torch.tensor([0.43, 0.7, 0.5], dtype=F64)
    return z_t, x0, noise, at, st, as_, ss


def test_posterior_at_eta_1_is_the_gaussian_posterior():
    """q(z_s | z_t, x0) = N(alpha_ts s_s^2/s_t^2 z_t + alpha_s s_ts^2/s_t^2 x0, s_ts^2 s_s^2/s_t^2) with
    alpha_ts = alpha_t/alpha_s and s_ts^2 = s_t^2 - alpha_ts^2 s_s^2 (Kingma et al. 2021, eq. 32)."""
    z_t, x0, noise, at, st, as_, ss = _posterior_case()
    at, st, as_, ss = (v[:, None] for v in (at, st, as_, ss))
    a_ts = at / as_
    s_ts2 = st**2 - a_ts**2 * ss**2
    mean = a_ts * ss**2 / st**2 * z_t + as_ * s_ts2 / st**2 * x0
    std = (s_ts2 * ss**2 / st**2).sqrt()
    got = posterior_sample_reference(z_t, x0, at.flatten(), st.flatten(), as_.flatten(), ss.flatten(), noise)
    torch.testing.assert_close(got, mean + std * noise)
    torch.testing.assert_close(posterior_sample_reference(z_t, x0, at.flatten(), st.flatten(), as_.flatten(),
                                                          ss.flatten(), None), mean)


def test_posterior_at_eta_0_is_ddim_and_eta_scales_the_noise():
    z_t, x0, noise, at, st, as_, ss = _posterior_case()
    v = [w[:, None] for w in (at, st, as_, ss)]
    eps_hat = (z_t - v[0] * x0) / v[1]
    ddim = v[2] * x0 + v[3] * eps_hat
    torch.testing.assert_close(posterior_sample_reference(z_t, x0, at, st, as_, ss, noise, eta=0.0), ddim)
    # eta = 0.5: noise std c = 0.5 s_s s_ts / s_t, and the eps_hat coefficient keeps the marginal variance s_s^2
    s_ts = (v[1] ** 2 - (v[0] / v[2]) ** 2 * v[3] ** 2).sqrt()
    c = 0.5 * v[3] * s_ts / v[1]
    expect = v[2] * x0 + (v[3] ** 2 - c**2).sqrt() * eps_hat + c * noise
    torch.testing.assert_close(posterior_sample_reference(z_t, x0, at, st, as_, ss, noise, eta=0.5), expect)
    # s equal to t (no step): the variance of the step is 0, clamped, and the result is z_t
    torch.testing.assert_close(posterior_sample_reference(z_t, x0, at, st, at, st, noise), z_t)
    # alpha_s/sigma_s noisier than the t state would make the variance negative: clamped to 0, no nan
    out = posterior_sample_reference(z_t, x0, at, st, at, st * 1.5, noise)
    assert bool(out.isfinite().all())
    torch.testing.assert_close(out, at[:, None] * x0 + 1.5 * st[:, None] * eps_hat)


def test_weighted_loss_reference_keeps_a_list_weight_on_the_batch_device():
    """On PyTorch's meta device (a stand-in for a GPU here): a per-sample weight given as a list goes where
    the batch is."""
    pred, target = torch.zeros(3, 4, device="meta"), torch.zeros(3, 4, device="meta")
    assert weighted_loss_reference(pred, target, [1.0, 2.0, 3.0]).device.type == "meta"
