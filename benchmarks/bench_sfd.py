"""One SFD iteration on CPU: the teacher's DPM-Solver++(3M) trajectory plus the student's per-step updates.

    FEWSTEP_BENCH_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_sfd.py --benchmark-only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sfd.py [--repeats 21] [key=value ...]   # side by side

Set-up: the ring8 network teacher (residual MLP, width 256 x 4 blocks, as ``objective=denoise`` trains it;
weights barely trained, which does not change the cost), SFD's defaults: NFE 2 with AFS, M = 3, so the
teacher takes 12 steps and the student 2 Euler steps with one Adam update each; batch 128, cosine LR decay.
Rows of group ``sfd-iteration``:
- ``bare``: the same arithmetic written inline (teacher loop, two student steps, two clipped AdamW steps,
  the LR schedule), the baseline;
- ``framework``: ``Trainer.iterate`` with the ``sfd`` objective (what ``core.run`` does per iteration);
- ``teacher-only``: the no-grad teacher trajectory alone, to show where the time goes.
The script form times bare and framework in turn within each repeat (``bench_dmd2.side_by_side``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from core.config import parse_overrides
from core.runconfig import resolve
from core.runner import Trainer
from plugins.samplers.ode import dpmpp_3m

os.environ.setdefault("FEWSTEP_TENSORBOARD", "0")


def build_trainer(root, overrides=()) -> Trainer:
    torch.manual_seed(0)
    root = Path(root)
    teacher = Trainer(resolve(parse_overrides(["objective=denoise", "teacher=gmm", "train.steps=1",
                                               "train.eval_samples=64", "train.progress=false",
                                               f"out={root / 'teacher'}"])))
    teacher.train()
    tr = Trainer(resolve(parse_overrides(["objective=sfd", "teacher=checkpoint", f"teacher.path={root / 'teacher'}",
                                          "train.progress=false", f"out={root / 'sfd'}", *overrides])))
    tr.build()
    return tr


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return build_trainer(tmp_path_factory.mktemp("bench-sfd"))


def framework_iteration(tr: Trainer, it: int) -> None:
    tr.iterate(it)


class Bare:
    """SFD's iteration by hand on the same networks (EDM schedule: alpha = 1, t = sigma)."""

    def __init__(self, tr: Trainer):
        self.teacher, self.student, self.B = tr.teacher, tr.student, tr.micro
        coarse, fine = tr.objective._grids(tr.teacher.schedule, 2)
        self.coarse, self.fine = coarse.tolist(), fine
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=tr.objective.config.lr, weight_decay=0.0)
        # the run's cosine decay (train.lr_decay=cosine), stepped once per iteration like the runner's
        assert tr.cfg.train.lr_decay == "cosine" and tr.cfg.train.warmup == 0 and tr.cfg.train.grad_clip == 10
        decay = lambda i: 0.5 * (1 + math.cos(math.pi * min(1.0, i / tr.cfg.train.steps)))  # noqa: E731
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, decay)

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
        self.schedule.step()


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


def iteration(tr: Trainer) -> dict:
    return {"sfd": {"bare": Bare(tr).step, "framework": lambda: framework_iteration(tr, 0)}}


if __name__ == "__main__":
    os.environ.setdefault("FEWSTEP_TENSORBOARD", "0")
    from bench_dmd2 import script

    script(sys.argv[1:], "sfd", build_trainer, iteration)
