"""Runner: checkpoints round-trip, exact resume (also after kill -9), sampling CLI, fsspec outputs."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import train
from core import checkpoint as ckpt
from core import files
from core.sample import main as sample_main

FAST = ["objective=denoise", "train.batch=64", "train.eval_every=0", "train.preview_every=0", "student.hidden=64",
        "student.depth=2", "train.ema=0.9", "train.warmup=5"]


def _final_weights(out):
    latest = files.read_json(os.path.join(out, "checkpoints", "latest.json"))
    return load_file(os.path.join(out, "checkpoints", latest["dir"], "weights.safetensors"))


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_identical(tmp_path):
    """Extending a finished 20-step run to 40 steps equals one 40-step run (constant LR after warmup;
    with lr_decay the schedule depends on train.steps, so extending a run changes it by design)."""
    full = train(*FAST, "train.steps=40", "train.ckpt_every=10", f"out={tmp_path / 'full'}")
    assert full["start"] == 0
    train(*FAST, "train.steps=20", "train.ckpt_every=10", f"out={tmp_path / 'split'}")
    resumed = train(*FAST, "train.steps=40", "train.ckpt_every=10", f"out={tmp_path / 'split'}")
    assert resumed["start"] == 20
    _assert_identical(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "split"))
    # optimizer moments and RNG state too
    latest = files.read_json(tmp_path / "full" / "checkpoints" / "latest.json")["dir"]
    _assert_identical(load_file(tmp_path / "full" / "checkpoints" / latest / "state.safetensors"),
                      load_file(tmp_path / "split" / "checkpoints" / latest / "state.safetensors"))
    # metrics.jsonl has each step once
    steps = [__import__("json").loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps == sorted(set(steps))


def test_checkpoint_round_trip_and_pruning(tmp_path):
    res = train(*FAST, "train.steps=30", "train.ckpt_every=10", "train.keep=2", f"out={tmp_path}")
    trainer = res["trainer"]
    dirs = sorted(os.listdir(tmp_path / "checkpoints"))
    assert dirs == ["latest.json", "step-00000020", "step-00000030"]
    weights, tensors, state = trainer.store.load()
    student = {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}
    _assert_identical(student, trainer.student.state_dict())
    opt = trainer.optimizers["denoiser"]
    restored = ckpt.unflatten_optimizer(state["optimizers"]["denoiser"], tensors)
    for pid, entries in opt.state_dict()["state"].items():
        for k, v in entries.items():
            assert torch.equal(restored["state"][pid][k], v)
    assert state["step"] == 30


# A third-party callback, installed the way pip installs one (a package and a .dist-info with its entry point),
# that kill -9s its own process when the step in $FEWSTEP_TEST_KILL_AT ends: a known point between two checkpoints.
KILLER = """
import os
import signal

from core import hookimpl


class KillAt:
    \"\"\"SIGKILL this process at the end of step $FEWSTEP_TEST_KILL_AT (tests only).\"\"\"

    def __init__(self, config=None):
        self.step = int(os.environ.get("FEWSTEP_TEST_KILL_AT", "-1"))

    @hookimpl
    def fewstep_iteration_end(self, trainer, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@hookimpl
def register_callbacks(register):
    register("kill-at", KillAt)
"""


def _install_killer(site):
    site.mkdir()
    (site / "fewstep_killer.py").write_text(KILLER)
    info = site / "fewstep_killer-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fewstep-killer\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fewstep]\nkiller = fewstep_killer\n")


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    args = [*FAST, "train.lr_decay=cosine", "train.steps=100", "train.ckpt_every=20", "train.keep=3"]
    train(*args, f"out={tmp_path / 'ref'}")
    _install_killer(tmp_path / "site")
    out = tmp_path / "killed"
    # same intra-op thread count as this process (conftest): float sums must happen in the same order
    env = {**os.environ, "FEWSTEP_TENSORBOARD": "0", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    env.pop("FEWSTEP_PLUGINS", None)
    run = [sys.executable, "-m", "core.run", *args, "train.progress=false", "callbacks=[kill-at]", f"out={out}"]
    proc = subprocess.run(run, env={**env, "FEWSTEP_TEST_KILL_AT": "50"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert files.read_json(out / "checkpoints" / "latest.json")["step"] == 40  # iterations 40-49 are lost
    proc = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)  # the same command resumes
    assert proc.returncode == 0 and "from step 40" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    _assert_identical(_final_weights(tmp_path / "ref"), _final_weights(out))


def test_memory_filesystem_output():
    res = train(*FAST, "train.steps=10", "train.ckpt_every=5", "out=memory://fewstep-test/run")
    assert files.exists("memory://fewstep-test/run/checkpoints/latest.json")
    assert files.exists("memory://fewstep-test/run/preview.png")
    again = train(*FAST, "train.steps=12", "train.ckpt_every=5", "out=memory://fewstep-test/run")
    assert again["start"] == 10 and res["start"] == 0


def test_sample_cli_for_run_and_teacher(tmp_path, capsys):
    train(*FAST, "train.steps=10", f"out={tmp_path / 'run'}")
    out = tmp_path / "s.npz"
    assert sample_main([f"run={tmp_path / 'run'}", "num=300", f"out={out}", "steps=3"]) == 0
    s = np.load(out)["samples"]
    assert s.shape == (300, 2) and s.dtype == np.float32 and (tmp_path / "s.png").exists()
    assert "3 steps" in capsys.readouterr().out
    t_out = tmp_path / "t.npz"
    assert sample_main(["teacher=gmm", "teacher.preset=cls4", "sampler=euler", "steps=48", "num=400",
                        f"out={t_out}", "label=2", "guidance=1"]) == 0
    data = np.load(t_out)
    # every sample of class 2 lies near one of its two modes (angles 4 and 5 of the 8-ring)
    ang = np.mod(np.arctan2(data["samples"][:, 1], data["samples"][:, 0]) / (2 * np.pi / 8), 8)
    assert np.all(np.abs(ang - np.clip(np.round(ang), 4, 5)) < 0.5) and set(data["labels"]) == {2}


def test_checkpoint_teacher_serves_a_trained_network(tmp_path):
    from conftest import run_config
    from core.roles import Networks

    train(*FAST, "train.steps=10", f"out={tmp_path / 'teacher'}")
    cfg = run_config("objective=denoise", "teacher=checkpoint", f"teacher.path={tmp_path / 'teacher'}",
                     f"out={tmp_path / 'x'}")
    nets = Networks(cfg)
    assert cfg.student.name == "copy" and cfg.data.name == "teacher-samples"
    x, t = torch.randn(8, 2), torch.full((8,), 1.0)
    torch.testing.assert_close(nets.student.denoise(x, t), nets.teacher.denoise(x, t))
    assert all(p.requires_grad for p in nets.student.parameters())
    assert not any(p.requires_grad for p in nets.teacher.net.parameters())
