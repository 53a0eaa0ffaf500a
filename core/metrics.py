"""Sample-quality metrics against reference samples: energy distance, sliced Wasserstein, mode mass.

All computed in float64 on flattened samples; callable on tensors or on ``.npz`` files
(``python -m core.metrics a.npz b.npz``). Metrics that need a plugin's data live with that
plugin and have their own command (the digits FID: docs/methods/digits.md).
"""

from __future__ import annotations

import io
import sys

import numpy as np
import torch
from torch import Tensor

from core.cli import guard


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


def load_samples(path: str) -> np.ndarray:
    """The ``samples`` array of an ``.npz`` written by ``core.sample``, checked: at least 2 rows of finite numbers."""
    from core.errors import ConfigError
    from core.files import read_bytes

    fix = "pass .npz files written by python -m core.sample"
    data = read_bytes(path, what="samples file", fix=fix)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if "samples" not in npz.files:
                raise ConfigError(f"{path} has no 'samples' array (it has: {', '.join(npz.files) or 'nothing'}); {fix}")
            x = npz["samples"]
    except ConfigError:
        raise
    except Exception as exc:  # np.load of untrusted bytes: not an npz, truncated, object arrays (never unpickled)
        raise ConfigError(f"{path} is not a readable .npz ({type(exc).__name__}: {exc}); {fix}") from None
    if x.dtype.kind not in "fiu" or x.ndim < 2:
        raise ConfigError(f"{path}: 'samples' must be a numeric N x D array, got {x.dtype} of shape {x.shape}; {fix}")
    if len(x) < 2:
        raise ConfigError(f"{path}: 'samples' has {len(x)} row(s); the metrics need at least 2 samples")
    if not np.isfinite(x).all():
        raise ConfigError(f"{path}: 'samples' holds NaN or inf ({int((~np.isfinite(x)).sum())} values); "
                          "regenerate it (the model that wrote it may have diverged)")
    return x


@guard
def main(argv: list[str]) -> int:
    """``python -m core.metrics SAMPLES.npz REFERENCE.npz``."""
    from core.errors import ConfigError

    if argv in (["-h"], ["--help"]):
        print("usage: python -m core.metrics SAMPLES.npz REFERENCE.npz  (each holding a 'samples' array)")
        return 0
    if len(argv) != 2 or any(a.startswith("-") for a in argv):
        raise ConfigError(f"expected two .npz files, got {len(argv)} argument(s); "
                          "usage: python -m core.metrics SAMPLES.npz REFERENCE.npz")
    a, b = (load_samples(p) for p in argv)
    if a[0].size != b[0].size:
        raise ConfigError(f"{argv[0]} holds samples of shape {a.shape[1:]} but {argv[1]} holds {b.shape[1:]}; "
                          "compare samples of the same data")
    print(f"energy_distance={energy_distance(a, b):.6f} sliced_wasserstein={sliced_wasserstein(a, b):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
