"""Run directories under stress: concurrent runs are refused by the lock, a full disk or a read-only
target is one line and exit 2 with no debris and the previous checkpoint still loading."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from core import checkpoint as ckpt
from core import files
from core.errors import RunLockedError
from core.lock import LOCK_NAME, RunLock
from core.run import main as run_main

FAST = ["objective=denoise", "train.batch=16", "student.hidden=16", "student.depth=1", "train.eval_every=0",
        "train.preview_every=0", "train.eval_samples=64", "train.progress=false"]


def _files(root) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for f in names:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _debris(root) -> list[str]:
    return [p for p in _files(root) if p.endswith(".tmp") or ".tmp" in os.path.basename(p)]


# -- the lock ---------------------------------------------------------------------------------------
def test_lock_is_exclusive_and_released(tmp_path):
    out = str(tmp_path / "run")
    with RunLock(out) as lock:
        held = json.loads(open(os.path.join(out, LOCK_NAME)).read())
        assert held == {"host": socket.gethostname(), "pid": os.getpid(), "started": lock.record["started"]}
        holder = f"in use by another run \\(host {socket.gethostname()}, PID {os.getpid()}"
        with pytest.raises(RunLockedError, match=holder):
            RunLock(out).acquire()
    assert not os.path.exists(out)  # created for the lock alone: removed with it


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "then"}))
    said = []
    with RunLock(str(tmp_path), said.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert said and f"PID {pid}" in said[0] and "took over" in said[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(RunLockedError, match="host elsewhere, PID 1"):
        RunLock(str(tmp_path)).acquire()


def _spawn(out, seed):
    env = {**os.environ, "FEWSTEP_TENSORBOARD": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "core.run", *FAST, "train.steps=1000000", "train.ckpt_every=20",
                             "train.log_every=10", f"seed={seed}", f"out={out}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_into_one_directory_never_mix(tmp_path):
    """Started together with different seeds: one trains, the other is refused naming it, and the run
    directory holds the winner's config and only the winner's metrics (each step once)."""
    out = str(tmp_path / "run")
    procs = {seed: _spawn(out, seed) for seed in (0, 1)}
    try:
        deadline = time.time() + 180
        while time.time() < deadline and all(p.poll() is None for p in procs.values()):
            time.sleep(0.05)
        losers = [s for s, p in procs.items() if p.poll() is not None]
        assert len(losers) == 1, "neither run was refused"
        loser, winner = losers[0], 1 - losers[0]
        err = procs[loser].stderr.read()
        assert procs[loser].returncode == 2, err
        assert f"in use by another run (host {socket.gethostname()}, PID {procs[winner].pid}" in err \
            or "holds a run with a different config (seed:" in err, err
        assert "Traceback" not in err
        latest = os.path.join(out, "checkpoints", "latest.json")
        while time.time() < deadline and not os.path.exists(latest):
            time.sleep(0.05)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
    cfg = files.read_yaml(os.path.join(out, "config.yaml"))
    assert cfg["seed"] == winner
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == sorted(set(steps))
    # the killed winner's lock is stale: resuming takes it over and finishes the run
    assert os.path.exists(os.path.join(out, LOCK_NAME))
    done = files.read_json(latest)["step"]
    assert run_main([*FAST, f"train.steps={done + 5}", "train.ckpt_every=20", "train.log_every=10", f"seed={winner}",
                     f"out={out}"]) == 0
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == done + 5


# -- full disk, read-only target ----------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs where this machine lets us mount one (root), else None."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode == 0
    yield mnt if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk, leave: int) -> None:
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(os.path.join(disk, "filler"), "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _assert_previous_checkpoint_loads(out, step):
    weights, tensors, state = ckpt.CheckpointStore(str(out)).load()
    assert state["step"] == step and weights and tensors


def test_full_disk_is_one_line_and_the_last_checkpoint_survives(small_disk, tmp_path, capsys, monkeypatch):
    """A real full disk (tmpfs) where possible, else a writer that fails half-way with ENOSPC."""
    if small_disk is not None:
        out = small_disk / "run"
    else:
        out = tmp_path / "run"
    assert run_main([*FAST, "train.steps=2", f"out={out}"]) == 0
    before = {k: v for k, v in _files(out).items() if k.startswith("checkpoints")}
    if small_disk is not None:
        _fill(small_disk, leave=16 * 1024)  # room for config.yaml and metrics, not for a checkpoint
    else:
        import fsspec.implementations.local as local

        real_write = local.LocalFileOpener.write

        def write(self, data):
            if "weights.safetensors" in self.path:
                real_write(self, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, data)

        monkeypatch.setattr(local.LocalFileOpener, "write", write)
    capsys.readouterr()
    assert run_main([*FAST, "train.steps=4", f"out={out}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fewstep: error: ")]
    assert len(lines) == 1 and "no space left on the device" in lines[0] and "Traceback" not in err, err
    monkeypatch.undo()
    if small_disk is not None:
        os.remove(small_disk / "filler")
    assert {k: v for k, v in _files(out).items() if k.startswith("checkpoints")} == before
    assert _debris(out) == [] and not os.path.exists(out / LOCK_NAME)
    _assert_previous_checkpoint_loads(out, 2)
    assert run_main([*FAST, "train.steps=4", f"out={out}"]) == 0  # with space again, it resumes and finishes
    _assert_previous_checkpoint_loads(out, 4)


def test_read_only_run_directory_is_one_line(small_disk, tmp_path, capsys):
    if small_disk is None and os.geteuid() == 0:
        pytest.skip("root ignores permissions and cannot mount a read-only tmpfs here")
    root = small_disk if small_disk is not None else tmp_path
    out = root / "run"
    assert run_main([*FAST, "train.steps=2", f"out={out}"]) == 0
    before = _files(out)
    if small_disk is not None:
        assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0
    else:
        os.chmod(out, 0o555)
    try:
        capsys.readouterr()
        for argv in ([*FAST, "train.steps=4", f"out={out}"], [*FAST, "train.steps=4", f"out={root}/new"]):
            assert run_main(argv) == 2
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("fewstep: error: ")]
            assert len(lines) == 1 and ("read-only" in lines[0] or "permission denied" in lines[0]), err
            assert "Traceback" not in err
    finally:
        if small_disk is not None:
            subprocess.run(["mount", "-o", "remount,rw", str(small_disk)])
        else:
            os.chmod(out, 0o755)
    assert _files(out) == before
    _assert_previous_checkpoint_loads(out, 2)


# -- resume keeps metrics.jsonl one line per logged step ----------------------------------------------
@pytest.mark.parametrize("resume_from", [None, 20], ids=["killed-before-any-checkpoint", "killed-after-step-20"])
def test_resume_from_any_prefix_logs_each_step_once(tmp_path, resume_from):
    """A run killed after logging steps its checkpoint does not hold (here: emulated by rolling the
    checkpoints back and leaving a half-written last line) logs each step exactly once after resuming."""
    out = tmp_path / "run"
    args = [*FAST, "train.steps=30", "train.log_every=10", "train.ckpt_every=20", "train.keep=3", f"out={out}"]
    assert run_main(args) == 0
    if resume_from is None:
        shutil.rmtree(out / "checkpoints")
    else:
        shutil.rmtree(out / "checkpoints" / "step-00000030")
        (out / "checkpoints" / "latest.json").write_text(json.dumps({"step": 20, "dir": "step-00000020"}))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "denoiser/lo')  # killed mid-write
    assert run_main(args) == 0
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [10, 20, 30]


def test_a_run_saved_before_new_options_existed_still_resumes(tmp_path, capsys):
    """Options added to fewstep after a run was written take their defaults when it resumes; a setting the run
    did save still has to match."""
    out = str(tmp_path / "run")
    assert run_main([*FAST, "train.steps=2", "train.ckpt_every=1", f"out={out}"]) == 0
    cfg_url = os.path.join(out, "config.yaml")
    cfg = files.read_yaml(cfg_url)
    for key in ("compile", "compile_mode", "grad_accum"):  # as if the run predates these options
        del cfg["train"][key]
    del cfg["objective"]["label_dropout"]
    files.write_bytes_atomic(cfg_url, yaml.safe_dump(cfg, sort_keys=False).encode())
    assert run_main([*FAST, "train.steps=3", "train.ckpt_every=1", f"out={out}"]) == 0
    assert files.read_json(os.path.join(out, "checkpoints", "latest.json"))["step"] == 3
    capsys.readouterr()
    assert run_main([*FAST, "train.steps=4", "objective.label_dropout=0.5", f"out={out}"]) == 2
    assert "objective.label_dropout: 0.1 -> 0.5" in capsys.readouterr().err
