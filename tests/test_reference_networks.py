"""The denoiser wrapper, CFG and the MLP backbone against formulas written out here.

``DenoiserNet`` is checked with a backbone whose output is a known function of its inputs, so the expected
x0 is EDM's D = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, Table 1, generalised to alpha != 1)
or the eps/v/flow conversion, with c_noise = -logSNR/8, all computed in float64 here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.networks import DenoiserNet, FourierEmbedding, FourierInput, ResidualMLP, guided
from core.schedules import EDMSchedule, FlowSchedule, VPCosineSchedule

F64 = torch.float64


class KnownBackbone(nn.Module):
    """F(x, c_noise, cond) = 0.7 x + c_noise (+ cond), recording every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise, cond=None, **kwargs):
        self.calls.append({"x": x, "c_noise": c_noise, "cond": cond, **kwargs})
        out = 0.7 * x + c_noise.view(-1, *([1] * (x.ndim - 1)))
        if cond is not None:
            out = out + cond.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return out + kwargs.get("shift", 0.0)


def _batch(dtype=F64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=g, dtype=F64).to(dtype)


def test_edm_denoiser_is_karras_preconditioning():
    sched, sd = EDMSchedule(), 0.8
    x, t = _batch(), torch.tensor([0.05, 0.5, 3.0, 40.0], dtype=F64)
    net = DenoiserNet(KnownBackbone(), sched, "edm", sigma_data=sd)
    got = net(x, t)
    sig = t[:, None]
    c_skip = sd**2 / (sig**2 + sd**2)
    c_out = sig * sd / (sig**2 + sd**2).sqrt()
    c_in = 1 / (sig**2 + sd**2).sqrt()
    c_noise = torch.log(t) / 4  # EDM's ln(sigma)/4
    torch.testing.assert_close(got, c_skip * x + c_out * (0.7 * c_in * x + c_noise[:, None]))
    torch.testing.assert_close(net.backbone.calls[-1]["c_noise"], c_noise)


def test_edm_denoiser_on_a_vp_schedule_uses_alpha():
    sched, sd = VPCosineSchedule(), 0.5
    x, t = _batch(), torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=F64)
    got = DenoiserNet(KnownBackbone(), sched, sigma_data=sd).denoise(x, t)
    a, s = torch.cos(math.pi * t / 2)[:, None], torch.sin(math.pi * t / 2)[:, None]
    var = a**2 * sd**2 + s**2
    c_noise = (2 * torch.log(s / a) / 8).flatten()  # -logSNR/8 with logSNR = 2 log(a/s)
    expect = a * sd**2 / var * x + s * sd / var.sqrt() * (0.7 * x / var.sqrt() + c_noise[:, None])
    torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
def test_non_edm_predictions_are_read_and_converted(prediction):
    sched = FlowSchedule()
    x, t = _batch(), torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=F64)
    got = DenoiserNet(KnownBackbone(), sched, prediction).denoise(x, t)
    a, s = (1 - t)[:, None], t[:, None]
    out = 0.7 * x + (2 * torch.log(s / a) / 8)  # the backbone sees x itself
    expect = {"x0": out, "eps": (x - s * out) / a, "v": (a * x - s * out) / (a * a + s * s),
              "flow": (x - s * out) / (a + s)}[prediction]
    torch.testing.assert_close(got, expect)


def test_low_precision_input_is_computed_in_float32_and_returned_in_its_dtype():
    sched = EDMSchedule()
    x16 = _batch(torch.bfloat16)
    t = torch.tensor([0.05, 0.5, 3.0, 40.0])
    bb = KnownBackbone()
    got = DenoiserNet(bb, sched).denoise(x16, t)
    assert got.dtype == torch.bfloat16 and bb.calls[-1]["x"].dtype == torch.float32
    ref = DenoiserNet(KnownBackbone(), sched).denoise(x16.double(), t.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-2)
    x32 = x16.float()
    assert DenoiserNet(KnownBackbone(), sched, "eps").denoise(x32, t).dtype == torch.float32


def test_scalar_time_condition_and_kwargs_reach_the_backbone():
    bb = KnownBackbone()
    net = DenoiserNet(bb, EDMSchedule())
    x, cond = _batch(), torch.tensor([0, 1, 2, 3])
    got = net.denoise(x, torch.tensor(2.0, dtype=F64), cond, shift=0.25)
    assert bb.calls[-1]["c_noise"].shape == (4,) and bb.calls[-1]["shift"] == 0.25
    assert torch.equal(bb.calls[-1]["cond"], cond)
    torch.testing.assert_close(got, net.denoise(x, torch.full((4,), 2.0, dtype=F64), cond, shift=0.25))


def test_calling_the_module_is_denoise_with_condition_and_keywords():
    bb = KnownBackbone()
    net = DenoiserNet(bb, EDMSchedule())
    x, t, cond = _batch(), torch.full((4,), 2.0, dtype=F64), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(net(x, t, cond, shift=0.25), net.denoise(x, t, cond, shift=0.25))
    assert torch.equal(bb.calls[-1]["cond"], cond) and bb.calls[-1]["shift"] == 0.25


class CountingDenoiser:
    """D(x, t, cond) = x t + cond (label -1 is the null condition), counting calls and their batch sizes."""

    def __init__(self):
        self.batches = []

    def denoise(self, x, t, cond=None):
        self.batches.append(x.shape[0])
        tt = torch.as_tensor(t, dtype=x.dtype)
        tt = tt.view(-1, 1) if tt.ndim else tt
        label = torch.full((x.shape[0],), -1.0, dtype=x.dtype) if cond is None else cond.to(x.dtype)
        return x * tt + label.view(-1, 1) ** 2


@pytest.mark.parametrize("w", [0.0, 2.0, 5.5])
def test_guided_is_uncond_plus_w_times_difference_in_one_batched_call(w):
    d = CountingDenoiser()
    x, t, cond = _batch(), torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64), torch.tensor([0, 1, 2, 3])
    x_c = x * t[:, None] + cond.to(F64)[:, None] ** 2
    x_u = x * t[:, None] + 1.0
    torch.testing.assert_close(guided(d, x, t, cond, w), x_u + w * (x_c - x_u))
    assert d.batches == [8]  # conditional and null rows in one call
    # a 0-d time is passed as it is for both halves
    torch.testing.assert_close(guided(d, x, torch.tensor(2.0, dtype=F64), cond, w),
                               x * 2 + 1 + w * (cond.to(F64)[:, None] ** 2 - 1))


def test_guided_without_guidance_is_one_plain_call():
    d = CountingDenoiser()
    x, t, cond = _batch(), torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64), torch.tensor([0, 1, 2, 3])
    for w in (None, 1, 1.0):
        torch.testing.assert_close(guided(d, x, t, cond, w), x * t[:, None] + cond.to(F64)[:, None] ** 2)
    torch.testing.assert_close(guided(d, x, t, None, 4.0), x * t[:, None] + 1.0)
    assert d.batches == [4, 4, 4, 4]


def test_fourier_embedding_is_cos_and_sin_of_two_pi_c_f():
    torch.manual_seed(0)
    emb = FourierEmbedding(4096, scale=3.0)
    assert emb.freqs.shape == (2048,)
    assert abs(float(emb.freqs.std()) - 3.0) < 0.15 and abs(float(emb.freqs.mean())) < 0.2
    c = torch.tensor([0.0, 0.1, -0.3])
    out = emb(c)
    angle = 2 * math.pi * c.double()[:, None] * emb.freqs.double()[None]
    torch.testing.assert_close(out.double(), torch.cat([angle.cos(), angle.sin()], 1), rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    assert abs(float(FourierEmbedding(4096).freqs.std()) - 16.0) < 0.8  # EDM's default scale


def test_residual_mlp_forward_written_out():
    torch.manual_seed(0)
    net = ResidualMLP(3, hidden=16, depth=2, emb_dim=8, num_classes=4).double()
    x, c = torch.randn(5, 3, dtype=F64), torch.randn(5, dtype=F64)
    cond = torch.tensor([0, 3, -1, 2, -1])
    extra = torch.randn(5, 16, dtype=F64)
    # reference: time embedding + class row (row 4 is the null label), then residual blocks fed h + emb
    emb = net.time(c) + net.label.weight[torch.tensor([0, 3, 4, 2, 4])]
    torch.testing.assert_close(net.embed(c, cond), emb)
    torch.testing.assert_close(net.embed(c, None), net.time(c) + net.label.weight[4])
    e = emb + extra
    h = net.inp(x) + e
    for block in net.blocks:
        h = h + block(h + e)
    torch.testing.assert_close(net(x, c, cond, extra_emb=extra), net.out(h))
    assert len(net.blocks) == 2 and net.label.num_embeddings == 5


def test_residual_mlp_default_architecture_and_unconditional():
    net = ResidualMLP(2)
    assert net.inp.out_features == 256 and len(net.blocks) == 4 and net.label is None
    assert net.time[0].freqs.shape == (64,) and net.time[1].in_features == 128
    assert [type(m) for m in net.blocks[0]] == [nn.LayerNorm, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert [type(m) for m in net.out] == [nn.LayerNorm, nn.SiLU, nn.Linear] and net.out[2].out_features == 2
    assert [type(m) for m in net.time] == [FourierEmbedding, nn.Linear, nn.SiLU, nn.Linear]
    x = torch.randn(3, 1, 2)  # any shape with 2 features per sample comes back in that shape
    out = net(x, torch.zeros(3))
    assert out.shape == (3, 1, 2)
    torch.testing.assert_close(net.embed(torch.zeros(3), torch.tensor([1, 2, 3])), net.time(torch.zeros(3)))


def test_fourier_input_is_x_then_cos_and_sin_of_two_pi_b_x():
    torch.manual_seed(0)
    lift = FourierInput(3, 4096, scale=2.5)
    assert lift.freqs.shape == (2048, 3) and lift.out_features == 3 + 4096
    assert abs(float(lift.freqs.std()) - 2.5) < 0.1 and abs(float(lift.freqs.mean())) < 0.1
    x = torch.randn(5, 3, dtype=F64)
    angle = 2 * math.pi * torch.einsum("nd,fd->nf", x, lift.freqs.double())
    torch.testing.assert_close(lift(x), torch.cat([x, angle.cos(), angle.sin()], 1))
    assert "freqs" in lift.state_dict()  # saved with the weights, so a reloaded network is the same function


def test_residual_mlp_with_fourier_input_feeds_the_lifted_input_to_the_first_layer():
    torch.manual_seed(0)
    net = ResidualMLP(2, hidden=16, depth=1, emb_dim=8, fourier_features=6, fourier_scale=3.0).double()
    assert net.fourier.freqs.shape == (3, 2) and net.inp.in_features == 2 + 6
    x, c = torch.randn(4, 2, dtype=F64), torch.randn(4, dtype=F64)
    angle = 2 * math.pi * x @ net.fourier.freqs.double().T
    emb = net.embed(c, None)
    h = net.inp(torch.cat([x, angle.cos(), angle.sin()], 1)) + emb
    h = h + net.blocks[0](h + emb)
    torch.testing.assert_close(net(x, c), net.out(h))
    # off (the default): no frequencies at all and the plain first layer, so older checkpoints still load
    plain = ResidualMLP(2, hidden=16, depth=1, emb_dim=8)
    assert plain.fourier is None and plain.inp.in_features == 2
    assert not any("fourier" in k for k in plain.state_dict())


def test_fourier_input_lets_the_mlp_fit_a_sharp_denoiser_that_the_plain_mlp_cannot_in_the_same_budget():
    """The reason for the option: at sigma = 0.17 the exact ring8 denoiser contracts each point onto its own mode,
    a piecewise map with sharp seams that a plain MLP fits slowly (spectral bias). Both nets get the same
    300 Adam steps on the exact denoiser's outputs and are scored on fresh points against it."""
    from plugins.gmm import GaussianMixtureTeacher, GMMConfig

    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    sched = teacher.schedule
    t = float(sched.t_from_fraction(torch.tensor(0.25, dtype=F64)))
    sigma = float(sched.sigma(torch.tensor(t, dtype=F64)))

    def pairs(n, seed):
        gen = torch.Generator().manual_seed(seed)
        x_t = teacher.sample_exact(n).double() + sigma * torch.randn(n, 2, generator=gen, dtype=F64)
        return x_t, teacher.denoise(x_t, torch.full((n,), t, dtype=F64))

    def fitted_error(features):
        torch.manual_seed(0)
        net = DenoiserNet(ResidualMLP(2, 64, 2, 16, fourier_features=features), sched, "edm",
                          teacher.sigma_data).double()
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        for step in range(300):
            x_t, target = pairs(256, step)
            loss = ((net.denoise(x_t, torch.full((256,), t, dtype=F64)) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        x_t, target = pairs(4000, 10_000)
        with torch.no_grad():
            return float(((net.denoise(x_t, torch.full((4000,), t, dtype=F64)) - target) ** 2).mean())

    plain, fourier = fitted_error(0), fitted_error(64)
    assert fourier < plain / 5, (plain, fourier)  # measured 0.0060 vs 0.00012


def test_float64_times_leave_a_float32_batch_in_float32():
    """The preconditioning is computed in the batch's dtype (float32 at least), not the time's: a float32
    network gets float32 inputs and noise levels from float64 sampler grids."""
    bb = KnownBackbone()
    net = DenoiserNet(bb, EDMSchedule())
    out = net.denoise(_batch(torch.float32), torch.full((4,), 2.0, dtype=F64))
    call = bb.calls[-1]
    assert (call["x"].dtype, call["c_noise"].dtype, out.dtype) == (torch.float32,) * 3


@pytest.mark.parametrize("prediction", ["edm", "eps"])
def test_condition_keywords_and_dtype_on_every_prediction(prediction):
    """Both branches (EDM preconditioning, and a converted prediction) hand the condition and keywords to the
    backbone and return the batch's own dtype; the default sigma_data is EDM's 0.5."""
    bb = KnownBackbone()
    net = DenoiserNet(bb, EDMSchedule(), prediction)
    assert net.sigma_data == 0.5
    x, t, cond = _batch(torch.bfloat16), torch.full((4,), 2.0), torch.tensor([0, 1, 2, 3])
    out = net.denoise(x, t, cond, shift=0.25)
    assert out.dtype == torch.bfloat16
    assert torch.equal(bb.calls[-1]["cond"], cond) and bb.calls[-1]["shift"] == 0.25
