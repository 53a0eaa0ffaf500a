"""Sample-quality metrics against reference samples: energy distance, sliced Wasserstein, mode mass.

All computed in float64 on flattened samples; callable on tensors or on ``.npz`` files
(``python -m core.metrics a.npz b.npz``); ``python -m core.metrics --digits x.npz`` scores digit images.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import Tensor


def _flat(x) -> Tensor:
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return x.detach().to(torch.float64).flatten(1).cpu()


def energy_distance(x, y, max_n: int = 4000) -> float:
    """E-statistic 2E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo), V-statistic form; 0 iff same law.

    Samples beyond ``max_n`` are dropped (the cost is quadratic)."""
    x, y = _flat(x)[:max_n], _flat(y)[:max_n]
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (len(x) * (len(x) - 1))
    yy = torch.cdist(y, y).sum() / (len(y) * (len(y) - 1))
    return float(2 * xy - xx - yy)


def sliced_wasserstein(x, y, projections: int = 256, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance (quantile matching)."""
    x, y = _flat(x), _flat(y)
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(0).values, (y @ dirs).sort(0).values
    q = torch.linspace(0, 1, max(len(x), len(y)), dtype=torch.float64)
    qx = px[(q * (len(x) - 1)).round().long()]
    qy = py[(q * (len(y) - 1)).round().long()]
    return float((qx - qy).abs().mean())


def mode_masses(assign: Tensor, num_modes: int) -> Tensor:
    """Fraction of samples per mode from integer mode assignments."""
    return torch.bincount(assign.cpu(), minlength=num_modes).double() / len(assign)


def mode_mass_error(masses: Tensor, weights: Tensor) -> float:
    """Total-variation distance between sampled mode masses and the true weights."""
    return float(0.5 * (masses.cpu() - weights.cpu().double()).abs().sum())


def gmm_report(teacher, samples: Tensor, reference: Tensor) -> dict:
    """Every metric for a mixture teacher (used in runs and tests)."""
    out = {"energy_distance": energy_distance(samples, reference),
           "sliced_wasserstein": sliced_wasserstein(samples, reference)}
    if hasattr(teacher, "assign_modes"):
        masses = mode_masses(teacher.assign_modes(samples.to(teacher.device)), len(teacher.weights))
        out["mode_mass_error"] = mode_mass_error(masses, teacher.weights)
        out["mode_mass_ratio_min"] = float((masses / teacher.weights.cpu()).min())
        out["mode_mass_ratio_max"] = float((masses / teacher.weights.cpu()).max())
    return out


def digits_main(argv: list[str]) -> int:
    """``python -m core.metrics --digits SAMPLES.npz``: the digits FID, class accuracy and class shares
    (docs/methods/digits.md). The metric lives with the digits data in plugins/digits; loaded on demand."""
    from core.cli import guard

    @guard
    def run(argv):
        if len(argv) != 1:
            from core.errors import UsageError

            raise UsageError("usage: python -m core.metrics --digits SAMPLES.npz (from python -m core.sample)")
        from plugins.digits.fid import format_report, report_npz

        print(format_report(report_npz(argv[0])))
        return 0

    return run(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--digits"]:
        return digits_main(argv[1:])
    if len(argv) != 2:
        print("usage: python -m core.metrics SAMPLES.npz REFERENCE.npz", file=sys.stderr)
        return 2
    a, b = (np.load(p)["samples"] for p in argv)
    print(f"energy_distance={energy_distance(a, b):.6f} sliced_wasserstein={sliced_wasserstein(a, b):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
