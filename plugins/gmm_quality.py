"""Mode-level quality of samples against an exact Gaussian mixture (the ``gmm`` teacher).

Energy distance says how far two laws are; these say *how* a sampler misses one:
- ``mode_mass_tv``: total variation between the sampled mode masses and the true ones;
- ``lost_modes``: modes that hold less than ``LOST_FRACTION`` of their true mass;
- ``off_manifold``: share of samples outside every mode, i.e. whose Mahalanobis distance to their most
  responsible component exceeds that component's chi-square quantile at ``OFF_MANIFOLD_LEVEL``. Exact samples
  score at most 1 - OFF_MANIFOLD_LEVEL, in any dimension; samples smeared between modes score high.

Samples are assigned to the component with the highest responsibility at the clean end of the schedule
(``GaussianMixtureTeacher.assign_modes``). For class-conditional rows the true masses are the class's weights,
averaged over the rows' labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.metrics import energy_distance, mode_mass_error, mode_masses

LOST_FRACTION = 0.1
OFF_MANIFOLD_LEVEL = 0.999


def exact_mixture(teacher):
    """The exact mixture behind ``teacher``: itself, or for a network teacher of one (``teacher=checkpoint``) the
    mixture its run was trained on, against which its students are scored."""
    while hasattr(teacher, "source"):
        teacher = teacher.source
    return teacher


def chi2_quantile(dof: int, level: float) -> float:
    """x with P(chi^2_dof <= x) = level, by bisection on the regularised incomplete gamma function."""
    a = torch.tensor(dof / 2, dtype=torch.float64)
    lo, hi = 0.0, float(dof + 40 * dof**0.5 + 100)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.special.gammainc(a, torch.tensor(mid / 2, dtype=torch.float64))) < level:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def target_masses(mixture, labels: Tensor | None = None) -> Tensor:
    """True mode masses of the rows: the mixture weights, or the labels' class weights averaged over rows."""
    if labels is None or getattr(mixture, "classes", None) is None:
        return mixture.weights.double().cpu()
    w = mixture.class_weights(labels.to(mixture.weights.device)).double()
    return (w / w.sum(1, keepdim=True)).mean(0).cpu()


def off_manifold_share(mixture, x: Tensor, modes: Tensor) -> float:
    """Share of rows whose squared Mahalanobis distance to their assigned component exceeds the chi-square
    quantile at OFF_MANIFOLD_LEVEL (diagonal covariances)."""
    x = x.to(mixture.means.device, torch.float64).flatten(1)
    modes = modes.to(mixture.means.device)
    d2 = (((x - mixture.means[modes]) / mixture.stds[modes]) ** 2).sum(1)
    return float((d2 > chi2_quantile(x.shape[1], OFF_MANIFOLD_LEVEL)).double().mean())


def mixture_quality(mixture, samples: Tensor, reference: Tensor, labels: Tensor | None = None) -> dict:
    """Energy distance to ``reference`` (exact samples, same labels) and the mode-level metrics above."""
    samples = samples.detach().float().cpu()
    modes = mixture.assign_modes(samples.to(mixture.means.device))
    masses = mode_masses(modes, len(mixture.weights))
    target = target_masses(mixture, labels)
    present = target > 0
    return {"energy_distance": energy_distance(samples, reference, max_n=len(samples)),
            "mode_mass_tv": mode_mass_error(masses, target),
            "lost_modes": int((masses[present] < LOST_FRACTION * target[present]).sum()),
            "off_manifold": off_manifold_share(mixture, samples, modes)}
