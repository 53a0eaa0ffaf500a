"""One DMD2 training iteration on the GMM (CPU), through the framework vs a bare hand-written torch loop.

    FEWSTEP_BENCH_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_dmd2.py --benchmark-only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dmd2.py [--repeats 21] [key=value ...]   # side by side

The run is the default demo's (``python -m core.run``: ring8, 1-step generator, residual MLP width 256 x 4
blocks for generator and critic, batch 128, GAN head on, regression loss on (analytic teacher), cosine LR
decay). Two kinds of iteration (method note sec. 3):
- ``generator``: n % r == 0, the generator update (DM + regression + GAN generator loss) and a critic update;
- ``critic``: every other iteration, the generator forward without grads and a critic update.
The ``bare`` row (the group's baseline) does the same arithmetic with the same networks, two AdamW
optimizers, grad clipping and the same LR schedule, written inline as a hand-written script would; the
``framework`` row (``Trainer.iterate``: what ``core.run`` does per iteration) over it is the runner's and
objective's overhead (phase scheduling, requires_grad toggling, hooks, non-finite guard, metrics).

The script form times the rows in turn within each repeat, on process CPU time, and prints the median of the
per-repeat ratios: on a shared machine that is steadier than pytest-benchmark's one-row-after-another.
Extra ``key=value`` arguments change the run, e.g. ``student.hidden=16`` (Python overhead dominates) or
``student.hidden=1024`` (the networks do).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import sys
import tempfile
import time

import pytest
import torch
from torch.nn import functional as F

from core.config import parse_overrides
from core.runconfig import resolve
from core.runner import Trainer
from core.timesteps import make_grid
from plugins.samplers.ode import dpmpp_2m

os.environ.setdefault("FEWSTEP_TENSORBOARD", "0")


def build_trainer(out, overrides=()) -> Trainer:
    torch.manual_seed(0)
    tr = Trainer(resolve(parse_overrides(["train.progress=false", f"out={out}", *overrides])))  # the default demo
    tr.build()
    return tr


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return build_trainer(tmp_path_factory.mktemp("bench-dmd2") / "run")


def framework_iteration(tr: Trainer, it: int) -> None:
    """What ``Trainer.train`` does for iteration ``it``: draw the batch, run every phase due, sum its metrics,
    the iteration-end hooks (no record or checkpoint is due at these iterations)."""
    tr.iterate(it)


def side_by_side(rows: dict, repeats: int = 21, inner: int = 5) -> dict[str, tuple[float, float]]:
    """Per row: (median seconds per call, median ratio to the first row). Each repeat times every row in turn
    (``inner`` calls each) on process CPU time, so a busy shared machine slows the rows alike."""
    for fn in rows.values():  # warm-up: optimizer state, allocator, first-call caches
        for _ in range(3):
            fn()
    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            t = time.process_time()
            for _ in range(inner):
                fn()
            times[name].append((time.process_time() - t) / inner)
    base = times[next(iter(rows))]
    return {name: (statistics.median(ts), statistics.median(t / b for t, b in zip(ts, base)))
            for name, ts in times.items()}


class Bare:
    """The same iteration written by hand against the same networks (one file, no framework)."""

    def __init__(self, tr: Trainer):
        cfg = tr.objective.config
        self.teacher, self.dataset = tr.teacher, tr.networks.dataset
        self.G, self.F, self.h = tr.nets["student"], tr.nets["critic"], tr.nets["gan_head"]
        self.B, self.lam_g, self.lam_d = tr.micro, cfg.gan_gen_weight, cfg.gan_disc_weight
        self.lam_reg, self.reg_steps = tr.objective.regression_weight, cfg.regression_steps
        lr = tr.objective.generator_lr
        self.opt_g = torch.optim.AdamW(self.G.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        self.opt_f = torch.optim.AdamW([*self.F.parameters(), *self.h.parameters()], lr=cfg.critic_lr or lr,
                                       weight_decay=cfg.weight_decay)
        # the run's cosine decay (train.lr_decay=cosine), stepped once per iteration like the runner's
        decay = lambda i: 0.5 * (1 + math.cos(math.pi * min(1.0, i / tr.cfg.train.steps)))  # noqa: E731
        assert tr.cfg.train.lr_decay == "cosine" and tr.cfg.train.warmup == 0 and tr.cfg.train.grad_clip == 10
        self.schedules = [torch.optim.lr_scheduler.LambdaLR(opt, decay) for opt in (self.opt_g, self.opt_f)]
        s = self.schedule = tr.teacher.schedule
        self.lo, self.hi, self.rho, self.sd = s.t_min ** (1 / s.rho), s.t_max ** (1 / s.rho), s.rho, self.F.sigma_data
        assert cfg.regression_solver == "dpmpp-2m" and tr.teacher.data_shape == (2,) and tr.cfg.train.ema == 0

    def sigma(self, a: float, b: float, n: int | None = None) -> torch.Tensor:  # Karras rho-spaced, fraction in [a, b]
        u = a + (b - a) * torch.rand(n or self.B, dtype=torch.float64)
        return ((self.lo + u * (self.hi - self.lo)) ** self.rho).float()

    def logits(self, x):  # hand-written trunk of the MLP critic up to its last LayerNorm, then the head
        s = self.sigma(0, 1, len(x))
        x_t = x + s[:, None] * torch.randn_like(x)
        bb = self.F.backbone
        emb = bb.embed(torch.log(s) / 4, None)
        h = bb.inp(x_t / torch.sqrt(s**2 + self.sd**2)[:, None]) + emb
        for block in bb.blocks:
            h = h + block(h + emb)
        return self.h(bb.out[0](h))

    def step(self, generator_step: bool) -> None:
        real = self.dataset.sample(self.B)["x"]
        z = 80.0 * torch.randn(self.B, 2)
        t_in = torch.full((self.B,), 80.0)
        if generator_step:
            self.F.requires_grad_(False)
            x = self.G.denoise(z, t_in)
            s = self.sigma(0.02, 0.98)
            with torch.no_grad():
                x_t = x + s[:, None] * torch.randn_like(x)
                real_x0, fake_x0 = self.teacher.denoise(x_t, s), self.F.denoise(x_t, s)
                g = (fake_x0 - real_x0).double() / (x - real_x0).double().abs().mean(1, keepdim=True)
                g = torch.nan_to_num(g, 0.0, 0.0, 0.0).float()
            loss = 0.5 * F.mse_loss(x, (x - g).detach()) + self.lam_g * F.softplus(-self.logits(x)).mean()
            if self.lam_reg:  # DMD's regression term: the teacher's 16-step DPM-Solver++(2M) ODE from z at 80
                with torch.no_grad():
                    target = dpmpp_2m(self.teacher, z / 80.0, make_grid(self.schedule, self.reg_steps, t_max=80.0))
                loss = loss + self.lam_reg * F.mse_loss(x, target)
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.G.parameters(), 10.0)
            self.opt_g.step()
            self.F.requires_grad_(True)
            x = x.detach()
        else:
            with torch.no_grad():
                x = self.G.denoise(z, t_in)
        self.G.requires_grad_(False)
        s = self.sigma(0, 1)
        x_t = x + s[:, None] * torch.randn_like(x)
        weight = 1 / s**2 + 1 / self.sd**2
        loss = (weight * (self.F.denoise(x_t, s) - x).square().mean(1)).mean()
        logits = self.logits(torch.cat([x, real]))
        loss = loss + self.lam_d * (F.softplus(logits[:self.B]).mean() + F.softplus(-logits[self.B:]).mean())
        self.opt_f.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.F.parameters(), *self.h.parameters()], 10.0)
        self.opt_f.step()
        self.G.requires_grad_(True)
        for schedule in self.schedules:
            schedule.step()


@pytest.mark.parametrize("kind", ["generator", "critic"])
@pytest.mark.parametrize("variant", ["bare", "framework"])
def test_dmd2_iteration(benchmark, trainer, machine, kind, variant):
    benchmark.group = f"dmd2-{kind}-iteration"
    benchmark.extra_info.update(machine=machine, variant="eager" if variant == "bare" else variant,
                                batch=trainer.micro, critic_updates=trainer.objective.critic_ratio)
    it = 0 if kind == "generator" else 1
    if variant == "bare":
        bare = Bare(trainer)
        benchmark(bare.step, kind == "generator")
    else:
        benchmark(framework_iteration, trainer, it)
    assert math.isfinite(benchmark.stats.stats.median)


def script(argv: list[str], name: str, build, groups) -> None:
    """The script form, ``[--repeats N] [key=value ...]``: ``build(tmp_dir, overrides)`` makes the trainer,
    ``groups(trainer)`` the rows to time, ``{label: {"bare": fn, "framework": fn}}``."""
    repeats = 21
    if argv[:1] == ["--repeats"]:
        repeats, argv = int(argv[1]), argv[2:]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tr = build(tmp, argv)
        print(f"{name} iteration, batch {tr.micro}, {' '.join(argv) or 'default run'}; {repeats} repeats, "
              "CPU time per iteration, median")
        for label, rows in groups(tr).items():
            (b, _), (f, ratio) = side_by_side(rows, repeats).values()
            print(f"  {label:9s}  bare {b * 1e3:8.2f} ms   framework {f * 1e3:8.2f} ms   ratio {ratio:.3f}")


def iteration_kinds(tr: Trainer) -> dict:
    bare = Bare(tr)
    return {kind: {"bare": functools.partial(bare.step, kind == "generator"),
                   "framework": functools.partial(framework_iteration, tr, it)}
            for kind, it in (("generator", 0), ("critic", 1))}


if __name__ == "__main__":
    os.environ.setdefault("FEWSTEP_TENSORBOARD", "0")
    script(sys.argv[1:], "dmd2", lambda tmp, argv: build_trainer(f"{tmp}/run", argv), iteration_kinds)
