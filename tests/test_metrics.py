"""Metrics against closed forms."""

import math

import numpy as np
import torch

from core.metrics import energy_distance, main, mode_mass_error, mode_masses, sliced_wasserstein


def _abs_normal_mean(m, s):
    """E|Z| for Z ~ N(m, s^2)."""
    return s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * math.erf(m / (s * math.sqrt(2)))


def test_energy_distance_of_shifted_gaussians():
    mu, n = 1.0, 4000
    x, y = torch.randn(n, 1, dtype=torch.float64), torch.randn(n, 1, dtype=torch.float64) + mu
    exact = 2 * _abs_normal_mean(mu, math.sqrt(2)) - 2 * _abs_normal_mean(0, math.sqrt(2))
    assert abs(energy_distance(x, y) - exact) < 0.03
    assert abs(energy_distance(x, torch.randn(n, 1, dtype=torch.float64))) < 0.01


def test_sliced_wasserstein_of_a_shift():
    """SW1 of a shift v in 2-D = |v| E|cos(phi)| = 2|v|/pi."""
    x = torch.randn(5000, 2, dtype=torch.float64)
    v = torch.tensor([0.6, -0.8], dtype=torch.float64)
    assert abs(sliced_wasserstein(x, x + v, projections=2000) - 2 / math.pi) < 0.02


def test_mode_masses():
    assign = torch.tensor([0, 0, 1, 3])
    m = mode_masses(assign, 4)
    torch.testing.assert_close(m, torch.tensor([0.5, 0.25, 0.0, 0.25], dtype=torch.float64))
    assert math.isclose(mode_mass_error(m, torch.full((4,), 0.25)), 0.25)


def test_cli_on_npz(tmp_path, capsys):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, samples=np.zeros((50, 2), np.float32))
    np.savez(b, samples=np.ones((50, 2), np.float32))
    assert main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    # all pairwise distances are sqrt(2) across, 0 within: 2 sqrt(2) in V-form within-set zeros
    assert f"energy_distance={2 * math.sqrt(2):.6f}" in out
    assert main([str(a)]) == 2
