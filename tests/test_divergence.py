"""train.nan_policy: a non-finite loss never trains silently. ``stop`` ends the run (at the next log, preview
or checkpoint step, before anything is written) with one line naming the phase and the first bad step, and
leaves the last good checkpoint as it was; ``skip`` drops exactly that optimizer step."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_config
from core import files
from core import hookimpl
from core.nanguard import NonFiniteGuard
from core.run import main as run_main
from core.runner import Trainer

FAST = ["objective=denoise", "train.batch=16", "student.hidden=16", "student.depth=1", "train.eval_every=0",
        "train.preview_every=0", "train.eval_samples=64", "train.progress=false", "train.steps=12",
        "train.ckpt_every=5", "train.log_every=4"]
BAD_ITERATION = 6  # 0-based: the loss of step 7 is NaN (then the weights are; the next log is at step 8)


class InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.fixture(params=["loss", "gradient"])
def nan_at_step_7(request, monkeypatch):
    """The objective's loss at step 7 is NaN, or finite with infinite gradients."""
    from plugins.denoise import Denoise

    real = Denoise.loss

    def loss(self, phase, ctx):
        value, metrics = real(self, phase, ctx)
        if ctx.iteration != BAD_ITERATION:
            return value, metrics
        return (value * float("nan") if request.param == "loss" else InfGradient.apply(value)), metrics

    monkeypatch.setattr(Denoise, "loss", loss)
    return request.param


@pytest.mark.parametrize("fold", [256, 2], ids=["checked-at-log", "folded-every-2-steps"])
def test_stop_names_phase_and_step_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, nan_at_step_7,
                                                                  fold):
    """The guard queues each step's loss and gradient norm on the device and folds them into its verdict every
    ``FOLD`` steps or at a check; either way the first bad step is the one named."""
    monkeypatch.setattr(NonFiniteGuard, "FOLD", fold)
    ref = tmp_path / "ref"  # the same run stopped at step 5 on purpose: the checkpoint the failed run must keep
    assert run_main([*FAST, "train.steps=5", f"out={ref}"]) == 0
    out = tmp_path / "run"
    capsys.readouterr()
    assert run_main([*FAST, f"out={out}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fewstep: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    what = nan_at_step_7
    assert f"non-finite {what} in phase 'denoiser' at step 7 (the last checkpoint (step 5) is untouched)" in lines[0]
    assert files.read_json(out / "checkpoints" / "latest.json")["step"] == 5
    assert sorted(os.listdir(out / "checkpoints")) == ["latest.json", "step-00000005"]
    for name in ("weights.safetensors", "state.safetensors"):
        a = load_file(ref / "checkpoints" / "step-00000005" / name)
        b = load_file(out / "checkpoints" / "step-00000005" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "fewstep.lock").exists()


class ParamProbe:
    """The student's parameters after every iteration."""

    def __init__(self):
        self.after = {}

    @hookimpl
    def fewstep_iteration_end(self, trainer, step):
        self.after[step] = [p.detach().clone() for p in trainer.student.parameters()]


def test_skip_drops_exactly_the_bad_step(tmp_path, capsys, nan_at_step_7):
    probe = ParamProbe()
    trainer = Trainer(run_config(*FAST, "train.nan_policy=skip", f"out={tmp_path}"), plugins=[probe])
    trainer.train()
    err = capsys.readouterr().err
    assert f"non-finite {nan_at_step_7} in phase 'denoiser' at step 7; skipped that optimizer step (1 so far" in err
    assert all(torch.equal(a, b) for a, b in zip(probe.after[6], probe.after[7]))  # step 7 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(probe.after[7], probe.after[8]))  # step 8 trains again
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
