"""One SFD iteration on CPU: the teacher's DPM-Solver++(3M) trajectory plus the student's per-step updates.

    FEWSTEP_BENCH_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_sfd.py --benchmark-only

Set-up: the ring8 network teacher (residual MLP, width 256 x 4 blocks, as ``objective=denoise`` trains it;
weights barely trained, which does not change the cost), SFD's defaults: NFE 2 with AFS, M = 3, so the
teacher takes 12 steps and the student 2 Euler steps with one Adam update each; batch 256.
Rows of group ``sfd-iteration``:
- ``bare``: the same arithmetic written inline (teacher loop, two student steps, two Adam steps), the baseline;
- ``framework``: ``Trainer.step`` with the ``sfd`` objective (what ``core.run`` does per iteration);
- ``teacher-only``: the no-grad teacher trajectory alone, to show where the time goes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from core.config import parse_overrides
from core.runconfig import resolve
from core.runner import Trainer
from plugins.samplers.ode import dpmpp_3m

os.environ.setdefault("FEWSTEP_TENSORBOARD", "0")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bench-sfd")
    teacher = Trainer(resolve(parse_overrides(["objective=denoise", "teacher=gmm", "train.steps=1",
                                               "train.eval_samples=64", "train.progress=false",
                                               f"out={root / 'teacher'}"])))
    teacher.train()
    tr = Trainer(resolve(parse_overrides(["objective=sfd", "teacher=checkpoint", f"teacher.path={root / 'teacher'}",
                                          "train.progress=false", f"out={root / 'sfd'}"])))
    tr.build()
    return tr


def framework_iteration(tr: Trainer, it: int) -> None:
    tr.step(it)


class Bare:
    """SFD's iteration by hand on the same networks (EDM schedule: alpha = 1, t = sigma)."""

    def __init__(self, tr: Trainer):
        self.teacher, self.student, self.B = tr.teacher, tr.student, tr.micro
        coarse, fine = tr.objective._grids(tr.teacher.schedule, 2)
        self.coarse, self.fine = coarse.tolist(), fine
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=2e-4, weight_decay=0.0)

    def step(self):
        z = torch.randn(self.B, 2)
        _, traj = dpmpp_3m(self.teacher, z, self.fine, return_trajectory=True)
        targets = traj[::4]
        s = self.coarse
        x = targets[0]
        x = x + (s[1] - s[0]) * x / math.sqrt(1 + s[0] ** 2)  # AFS
        for i in (1, 2):
            x0 = self.student.denoise(x, torch.full((self.B,), s[i]))
            x_next = x0 + s[i + 1] / s[i] * (x - x0)
            loss = (x_next - targets[i + 1]).abs().mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 10.0)
            self.opt.step()
            x = x_next.detach()


@pytest.mark.parametrize("variant", ["bare", "framework", "teacher-only"])
def test_sfd_iteration(benchmark, trainer, machine, variant):
    benchmark.group = "sfd-iteration"
    benchmark.extra_info.update(machine=machine, variant="eager" if variant == "bare" else variant,
                                batch=trainer.micro, teacher_nfe=12, student_updates=2)
    if variant == "bare":
        benchmark(Bare(trainer).step)
    elif variant == "framework":
        benchmark(framework_iteration, trainer, 0)
    else:
        fine = trainer.objective._grids(trainer.teacher.schedule, 2)[1]
        benchmark(dpmpp_3m, trainer.teacher, torch.randn(trainer.micro, 2), fine)
    assert math.isfinite(benchmark.stats.stats.median)
