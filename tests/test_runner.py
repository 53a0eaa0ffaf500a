"""Runner: checkpoints round-trip, exact resume (also after kill -9), sampling CLI, fsspec outputs."""

import os
import signal
import subprocess
import sys
import time

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


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    args = [*FAST, "train.lr_decay=cosine", "train.steps=200", "train.ckpt_every=20", "train.keep=3"]
    train(*args, f"out={tmp_path / 'ref'}")
    out = tmp_path / "killed"
    # same intra-op thread count as this process (conftest): float sums must happen in the same order
    env = {**os.environ, "FEWSTEP_TENSORBOARD": "0", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "core.run", *args, "train.progress=false", f"out={out}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and files.read_json(latest)["step"] >= 40:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = files.read_json(latest)["step"]
    assert killed_at < 200
    res = train(*args, f"out={out}")
    assert res["start"] == killed_at
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
