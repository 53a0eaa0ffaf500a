"""Which step of a K-step DMD2 student falls short? Score the x0 after each step of its own rollout.

    python -m benchmarks.rollout_steps run=runs/grid25-4 [num=10000]

Loads a finished run on an exact mixture teacher (``teacher=gmm``, unconditional) or on a network teacher of one
(``teacher=checkpoint``, whose ODE is then the reference), samples ``num`` rollouts of its
``multistep`` sampler and, at each step j, scores the step's x0 against exact samples (``plugins.gmm_quality``)
next to where the teacher's probability-flow ODE (32 DPM++ steps) takes the same input. "move" is the mean
distance from the input's clean estimate x_tau / alpha to the step's x0, for the student and for the ODE: a step
whose move falls short of the ODE's has not learnt its map.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.quality import _quiet_torch
from core.cli import guard
from core.errors import UsageError
from core.generation import multistep
from core.registry import get_registry
from core.timesteps import make_grid
from plugins.gmm_quality import exact_mixture, mixture_quality


@torch.no_grad()
def rollout_x0(student, times, noise):
    """(input at tau_j, x0 of step j) for every step of the student's multistep rollout from ``noise``."""
    x0s = []
    _, states = multistep(student, noise, times, None, return_trajectory=True,
                          callback=lambda d: x0s.append(d["denoised"]))
    return list(zip(states[:-1], x0s))


@torch.no_grad()
def teacher_ode(teacher, x, t, first: bool, steps: int = 32):
    """Where the teacher's PF-ODE takes x at time t (from t_max for the first step, whose input is pure noise)."""
    sched = teacher.schedule
    t = torch.as_tensor(t, dtype=torch.float64)
    grid = make_grid(sched, steps) if first else make_grid(sched, steps, t_max=float(t))
    return get_registry().get("sampler", "dpmpp-2m").factory(teacher, x / sched.sigma(t).to(x.dtype), grid, None)


@guard
def main(argv: list[str]) -> int:
    _quiet_torch()
    from core.rundir import load_run

    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    if "run" not in opts or set(opts) - {"run", "num"}:
        raise UsageError("usage: python -m benchmarks.rollout_steps run=RUN_DIR [num=N]")
    nets, spec, _ = load_run(opts["run"])
    student, teacher, n = nets.student.eval(), nets.teacher, int(opts.get("num", 10000))
    mixture = exact_mixture(teacher)  # for a network teacher: the ODE is the network's, the scores the mixture's
    if spec.sampler != "multistep" or not hasattr(mixture, "sample_exact") or getattr(mixture, "num_classes", 0):
        raise UsageError("rollout_steps needs a multistep run (objective=dmd2) on an unconditional exact mixture "
                         "teacher (teacher=gmm with ring8, grid25, hd16 or a teacher.spec file), or on a network "
                         "teacher of one (teacher=checkpoint)")
    times, sched = torch.tensor(spec.times, dtype=torch.float64), teacher.schedule
    torch.manual_seed(1007)
    reference = mixture.sample_exact(n, None)
    torch.manual_seed(7)
    steps = rollout_x0(student, times, torch.randn(n, *teacher.data_shape))
    print("| step (sigma) | x0: ED | off-manifold | lost | teacher ODE from the same input: ED | off-manifold | "
          "move | ODE's move |")
    print("|---|---|---|---|---|---|---|---|")
    for j, (x, x0) in enumerate(steps):
        t = times[j]
        ode = teacher_ode(teacher, x, t, j == 0)
        q, qo = mixture_quality(mixture, x0, reference), mixture_quality(mixture, ode, reference)
        clean = x / sched.alpha(t).to(x.dtype)
        move = "–" if j == 0 else f"{float((x0 - clean).norm(dim=1).mean()):.3f}"
        ode_move = "–" if j == 0 else f"{float((ode - clean).norm(dim=1).mean()):.3f}"
        print(f"| {j} ({float(sched.sigma(t)):.3g}) | {q['energy_distance']:.5f} | {q['off_manifold']:.3f} | "
              f"{q['lost_modes']} | {qo['energy_distance']:.5f} | {qo['off_manifold']:.3f} | {move} | {ode_move} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
