"""Which step of a k-step ancestral student loses the modes? Start its chain from the exact marginal at each grid time.

    python -m benchmarks.chain_steps objective=mm teacher.preset=grid25 seed=0
    python -m benchmarks.chain_steps objective=mm teacher.preset=grid25 objective.time_sampling=continuous \
        objective.weighting=edm                                       # the paper's settings, MM's old defaults
    python -m benchmarks.chain_steps objective=mm teacher=checkpoint teacher.path=RUN student=copy
                                                  # a network teacher of a mixture (RUN: objective=denoise), its copy

Trains one run on an exact mixture teacher, or a network teacher of one (the overrides, as for
``python -m core.run``), then for each grid time tau_j draws z ~ q(z_tau_j) exactly (mixture samples plus noise)
and runs the student's remaining steps j..k-1 from there. Scored against exact samples (``plugins.gmm_quality``):
the final samples, and the x~ of step j itself. A step that breaks what it was given shows as the first j whose
final score is far worse than j + 1's.
"""

from __future__ import annotations

import sys
import tempfile

import torch

from benchmarks.quality import _quiet_torch, _train
from core import ops
from core.cli import guard
from core.errors import UsageError
from plugins.gmm_quality import exact_mixture, mixture_quality


@torch.no_grad()
def chain_from(student, times, z, first: int):
    """The student's ancestral steps first..k-1 from z at times[first]: (final x~, step first's x~)."""
    sched, n = student.schedule, z.shape[0]
    for i in range(first, len(times) - 1):
        t, s = times[i], times[i + 1]
        x_tilde = student.denoise(z, t.to(z.dtype).expand(n), None)
        own = x_tilde if i == first else own
        if s > 0:
            xi = torch.randn(z.shape, dtype=torch.float64)
            z = ops.posterior_sample(z.double(), x_tilde.double(), sched.alpha(t), sched.sigma(t), sched.alpha(s),
                                     sched.sigma(s), xi, 1.0).to(z.dtype)
    return x_tilde, own


@guard
def main(argv: list[str]) -> int:
    _quiet_torch()
    with tempfile.TemporaryDirectory() as out:
        trainer = _train([*argv, f"out={out}", "train.eval_every=0", "train.preview_every=0"])
    student, mixture = trainer.sampling_model(), exact_mixture(trainer.teacher)
    if trainer.spec.sampler != "ancestral" or getattr(mixture, "num_classes", 0) or not hasattr(mixture, "sample_exact"):
        raise UsageError("chain_steps needs an ancestral student of an unconditional exact mixture: objective=mm "
                         "with teacher=gmm and a preset without classes (ring8, grid25, hd16)")
    times, sched, n = torch.tensor(trainer.spec.times, dtype=torch.float64), student.schedule, 5000
    torch.manual_seed(1007)
    reference = mixture.sample_exact(n, None)
    print("| chain starts from the exact marginal at | final ED | final TV | lost | that step's x~: ED | lost | tr Cov |")
    print("|---|---|---|---|---|---|---|")
    for j in range(len(times) - 1):
        torch.manual_seed(7 + j)
        x = mixture.sample_exact(n, None)
        z = ops.add_noise(x, torch.randn_like(x), sched.alpha(times[j]).float(), sched.sigma(times[j]).float())
        final, own = chain_from(student, times, z, j)
        f, o = mixture_quality(mixture, final, reference), mixture_quality(mixture, own, reference)
        sigma = float(sched.sigma(times[j]) / sched.alpha(times[j]))
        print(f"| step {j} (sigma {sigma:.3g}) | {f['energy_distance']:.4f} | {f['mode_mass_tv']:.3f} | "
              f"{f['lost_modes']} | {o['energy_distance']:.4f} | {o['lost_modes']} | {float(torch.cov(own.T).trace()):.3f} |")
    print(f"(exact samples: tr Cov {float(torch.cov(reference.T).trace()):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
