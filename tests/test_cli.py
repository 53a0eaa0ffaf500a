"""CLI behaviour: bad input is one clear line, exit code 2, and nothing on disk changes."""

import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from core.run import main as run_main
from core.sample import main as sample_main


def _snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "run")
    assert run_main(["objective=denoise", "train.steps=20", "train.batch=64", "train.eval_every=0",
                     "train.progress=false", f"out={out}"]) == 0
    return out


BAD_RUN_INPUTS = [
    (["objective=dmd3"], "unknown objective 'dmd3'"),
    (["teacher=gmn"], "unknown teacher 'gmn' (did you mean 'gmm'?)"),
    (["teacher.prest=ring8"], "unknown key 'teacher.prest' (did you mean 'preset'?)"),
    (["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
    (["train.steps=1.5"], "train.steps: expected an integer"),
    (["train.steps=-5"], "train.steps: must be > 0, got -5"),
    (["train.ema=1.5"], "train.ema: must be in [0, 1], got 1.5"),
    (["train.device=gpu"], "train.device: must be one of auto, cpu, cuda, got 'gpu' (did you mean 'cpu'?)"),
    (["train.progress=maybe"], "train.progress: expected true or false"),
    (["teacher.preset=ring9"], "unknown gmm preset 'ring9'"),
    (["teacher.sigma_min=100"], "sigma_min (100.0) must be below sigma_max"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["foo"], "expected key=value, got 'foo'"),
    (["config=/no/such/config.yaml"], "config=/no/such/config.yaml: no such file"),
    (["objective=denoise", "critic=fake-score"], "uses no critic"),
    (["student=nope"], "unknown student 'nope'"),
    (["objective=denoise", "seed=x"], "seed: expected an integer"),
    (["sampler=ancestral"], "sampler= is not a training setting"),
    (["sampler.eta=0.5"], "sampler= is not a training setting"),
]


@pytest.mark.parametrize("argv,message", BAD_RUN_INPUTS, ids=[" ".join(a) for a, _ in BAD_RUN_INPUTS])
def test_bad_run_input_is_one_line_exit_2_and_touches_nothing(argv, message, existing_run, capsys):
    before = _snapshot(existing_run)
    assert run_main([*argv, f"out={existing_run}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fewstep: error: "), err
    assert message in err
    assert _snapshot(existing_run) == before


def test_different_config_in_existing_run_is_refused(existing_run, capsys):
    before = _snapshot(existing_run)
    assert run_main(["objective=denoise", "teacher.preset=grid25", "train.steps=20", "train.batch=64",
                     "train.eval_every=0", "train.progress=false", f"out={existing_run}"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config (teacher.preset: 'ring8' -> 'grid25')" in err
    assert _snapshot(existing_run) == before


def test_non_run_directory_is_refused(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert run_main(["objective=denoise", f"out={tmp_path}"]) == 2
    assert "is not a fewstep run" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


BAD_SAMPLE_INPUTS = [
    (["run=/no/such/run"], "is not a fewstep run"),
    (["teacher=gmm", "num=0"], "num must be > 0"),
    (["teacher=gmm", "out=x.txt"], "expected a .npz path"),
    (["teacher=gmm", "sampler=eulr"], "unknown sampler 'eulr'"),
    (["num=10"], "give run=RUN_DIR"),
]


@pytest.mark.parametrize("argv,message", BAD_SAMPLE_INPUTS, ids=[" ".join(a) for a, _ in BAD_SAMPLE_INPUTS])
def test_bad_sample_input(argv, message, capsys):
    assert sample_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_exit_code_from_a_real_process():
    res = subprocess.run([sys.executable, "-m", "core.run", "objective=nope"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("fewstep: error: unknown objective 'nope'")


def test_help_lists_fields(capsys):
    assert run_main(["help", "teacher=gmm"]) == 0
    out = capsys.readouterr().out
    assert "teacher=gmm" in out and "preset" in out and "sigma_max" in out
    assert run_main(["--help"]) == 0
    assert "train.*" in capsys.readouterr().out


def test_config_file_reruns_the_same_run(existing_run, tmp_path, capsys):
    cfg = yaml.safe_load(open(os.path.join(existing_run, "config.yaml")))
    assert cfg["objective"]["name"] == "denoise" and cfg["train"]["steps"] == 20
    out = str(tmp_path / "again")
    assert run_main([f"config={existing_run}/config.yaml", f"out={out}"]) == 0
    again = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert {k: v for k, v in again.items() if k != "out"} == {k: v for k, v in cfg.items() if k != "out"}


def test_a_training_config_yaml_holds_no_sampler_and_a_set_one_is_refused(tmp_path, capsys):
    """A run previews and exports with its objective's sampler, so its config.yaml saves none. Runs made before
    this saved the default ``sampler: {name: euler}``, which nothing read: they still resume; a config.yaml
    that sets another sampler is refused (one line, exit 2, nothing changed)."""
    fast = ["objective=denoise", "train.batch=16", "student.hidden=16", "student.depth=1", "train.eval_every=0",
            "train.preview_every=0", "train.eval_samples=64", "train.progress=false"]
    out = tmp_path / "run"
    assert run_main([*fast, "train.steps=2", f"out={out}"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert "sampler" not in config
    legacy = {"sampler": {"name": "euler"}, **config}  # as an older fewstep wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(legacy, sort_keys=False))
    assert run_main([f"config={out / 'config.yaml'}", "train.steps=3"]) == 0
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump({**legacy, "sampler": {"name": "heun"}, "out": str(out)}, sort_keys=False))
    before = _snapshot(out)
    capsys.readouterr()
    assert run_main([f"config={edited}", "train.steps=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fewstep: error: the config.yaml sets a sampler, which is not a training setting (a run previews "
                   "and exports with its objective's sampler); delete its sampler: entry"]
    assert _snapshot(out) == before
