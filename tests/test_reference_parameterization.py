"""Parameterisation conversions against the closed forms written out here (any alpha, sigma), plus what the
mutation run found untested: the dtype of mixed-precision per-sample factors and the error for an unknown kind."""

from __future__ import annotations

import pytest
import torch

from core.parameterization import bcast, edm_weight, from_x0, precondition, to_x0

A = torch.tensor([0.9, 0.4, 1.0], dtype=torch.float64)
S = torch.tensor([0.3, 1.7, 0.05], dtype=torch.float64)


def _case(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(3, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    x_t = A[:, None, None] * x0 + S[:, None, None] * eps
    return x0.to(dtype), eps.to(dtype), x_t.to(dtype)


# the network outputs for x_t = alpha x0 + sigma eps (v as in Salimans & Ho 2022 generalised; flow v = eps - x0)
OUTPUTS = {"x0": lambda x0, eps, a, s: x0, "eps": lambda x0, eps, a, s: eps,
           "v": lambda x0, eps, a, s: a * eps - s * x0, "flow": lambda x0, eps, a, s: eps - x0}


@pytest.mark.parametrize("prediction", list(OUTPUTS))
def test_conversions_match_closed_forms(prediction):
    x0, eps, x_t = _case()
    a, s = A[:, None, None], S[:, None, None]
    out = OUTPUTS[prediction](x0, eps, a, s)
    torch.testing.assert_close(from_x0(x0, x_t, A, S, prediction), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(to_x0(out, x_t, A, S, prediction), x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", list(OUTPUTS))
def test_float64_factors_keep_the_tensor_dtype(prediction):
    """Schedules hand out float64 alpha/sigma; a float32 (or bf16) x stays in its dtype."""
    for dtype in (torch.float32, torch.bfloat16):
        x0, eps, x_t = _case(dtype)
        assert to_x0(x0, x_t, A, S, prediction).dtype == dtype
        assert from_x0(x0, x_t, A, S, prediction).dtype == dtype
        assert bcast(A, x_t).dtype == dtype and bcast(A, x_t).shape == (3, 1, 1)
        assert bcast(torch.tensor(0.5, dtype=torch.float64), x_t).dtype == dtype
        assert bcast(2, x_t).dtype == dtype  # integer scalars too
        assert all(c.dtype == dtype for c in precondition(A, S, 0.5, x_t))


def test_unknown_prediction_names_it_and_the_choices():
    x0, _, x_t = _case()
    for fn in (to_x0, from_x0):
        with pytest.raises(ValueError, match=r"unknown prediction type 'score'.*eps.*v.*x0.*flow"):
            fn(x0, x_t, A, S, "score")


def test_edm_weight_is_one_over_c_out_squared():
    """EDM (Karras et al. 2022, sec. 5 and Table 1) picks lambda(sigma) = 1 / c_out(sigma)^2, which with
    c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2) is 1/sigma^2 + 1/sigma_d^2; both forms, and the
    preconditioner's own c_out at alpha = 1, agree with the helper."""
    sigma_d = 0.5
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 80.0], dtype=torch.float64)
    weight = edm_weight(sigma, sigma_d)
    torch.testing.assert_close(weight, 1 / sigma**2 + 1 / sigma_d**2, rtol=1e-13, atol=0)
    _, _, c_out = precondition(torch.ones_like(sigma), sigma, sigma_d, sigma)
    torch.testing.assert_close(weight * c_out**2, torch.ones_like(sigma), rtol=1e-13, atol=0)
