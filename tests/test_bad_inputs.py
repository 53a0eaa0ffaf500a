"""The bad-input battery (issue 17): every bad input to ``core.run``, ``core.sample`` and ``core.metrics``
ends in exactly one ``fewstep: error:`` line, exit code 2, no traceback, and every file and directory
that existed before is still there, byte-identical (and nothing new is left behind).

Cases run in-process through the CLI ``main`` functions (fast); a few go through real processes to
prove the entry points. The run directories they damage are copies of tiny 2-step runs built once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import attrs
import numpy as np
import pytest
import torch

from core.config import GROUP_KIND, TrainConfig
from core.metrics import main as metrics_main
from core.registry import get_registry, set_registry
from core.run import main as run_main
from core.sample import main as sample_main

MAINS = {"run": run_main, "sample": sample_main, "metrics": metrics_main}
FAST = ["objective=denoise", "train.steps=2", "train.batch=16", "student.hidden=16", "student.depth=1",
        "train.eval_every=0", "train.preview_every=0", "train.eval_samples=64", "train.progress=false"]
CKPT = "checkpoints/step-00000002"


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished tiny runs (denoise; denoise with a wider student; dmd2) and two sample files."""
    root = tmp_path_factory.mktemp("battery")
    paths = {"root": str(root)}
    for name, extra in [("good", []), ("wide", ["student.hidden=32"]),
                        ("dmd2", ["objective=dmd2", "train.batch=16"])]:
        out = str(root / name)
        argv = [a for a in FAST if not (extra and extra[0].startswith("objective=") and a.startswith("objective="))]
        assert run_main([*argv, *extra, f"out={out}"]) == 0
        paths[name] = out
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        paths[name] = str(root / f"{name}.npz")
        np.savez(paths[name], samples=rng.normal(size=(64, 2)).astype(np.float32))
    return paths


def snapshot(*roots) -> dict:
    """Every file (sha256) and directory under ``roots``."""
    out = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            for d in dirs:
                out[os.path.join(dirpath, d)] = "dir"
            for f in files:
                p = os.path.join(dirpath, f)
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def assert_one_error_line(err: str, expect: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("fewstep: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    assert expect in errors[0], errors[0]


# -- damage to a copied run directory -------------------------------------------------------------
def truncate(rel: str, keep: float | int = 0.5):
    def damage(run, runs):
        p = os.path.join(run, rel)
        data = open(p, "rb").read()
        n = int(len(data) * keep) if isinstance(keep, float) else keep
        open(p, "wb").write(data[:n])
    return damage


def write(rel: str, data):
    def damage(run, runs):
        p = os.path.join(run, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        payload = data(runs) if callable(data) else data
        open(p, "wb").write(payload if isinstance(payload, bytes) else payload.encode())
    return damage


def remove(rel: str):
    def damage(run, runs):
        p = os.path.join(run, rel)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return damage


def replace_dir(rel: str, source: str):
    """Put another run's file or directory in place of ``rel`` (another size's / objective's checkpoint)."""
    def damage(run, runs):
        src, dst = os.path.join(runs[source], rel), os.path.join(run, rel)
        if os.path.isdir(src):
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
    return damage


def directory(rel: str):
    def damage(run, runs):
        p = os.path.join(run, rel)
        os.remove(p)
        os.makedirs(p)
    return damage


def both(*damages):
    def damage(run, runs):
        for d in damages:
            d(run, runs)
    return damage


def torch_pickle(runs) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


PICKLE = pickle.dumps({"w": [0.0, 1.0]}, protocol=2)


# -- the cases ------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    entry: str  # run | sample | metrics
    argv: list[str]  # {run}: a damaged copy of the good run; {tmp}: this case's tmp dir; {a} {b}: .npz files
    expect: str  # a fragment of the error line
    damage: object = None  # applied to {run} before the call
    files: dict = field(default_factory=dict)  # {tmp}/NAME -> bytes or str, written before the call
    env: dict = field(default_factory=dict)  # environment for a fresh registry


def float_cases() -> list[Case]:
    """nan and inf for every float option of every installed plugin, and of train.*."""
    reg = get_registry()
    cases = []
    needs = {"critic": ["objective=dmd2"]}
    for group, kind in GROUP_KIND.items():
        for name, info in sorted(reg.plugins[kind].items()):
            for f in attrs.fields(info.config) if info.config is not None else ():
                if f.type not in (float, float | None, "float", "float | None"):
                    continue
                for value in ("nan", "inf"):
                    if group == "sampler":  # samplers are chosen when sampling (a run uses its objective's)
                        entry, argv = "sample", ["teacher=gmm", f"sampler={name}", f"sampler.{f.name}={value}"]
                    else:
                        entry = "run"
                        argv = [*needs.get(group, []), f"{group}={name}", f"{group}.{f.name}={value}", "out={tmp}/new"]
                    cases.append(Case(f"{group}={name}.{f.name}={value}", entry, argv,
                                      f"{group}.{f.name}: expected a finite number"))
    for f in attrs.fields(TrainConfig):
        if f.type in (float, float | None, "float", "float | None"):
            for value in ("nan", "inf", "-inf"):
                cases.append(Case(f"train.{f.name}={value}", "run", [f"train.{f.name}={value}", "out={tmp}/new"],
                                  f"train.{f.name}: expected a finite number"))
    return cases


RESUME = [*FAST, "train.steps=3", "out={run}"]
SAMPLE_RUN = ["run={run}", "num=8", "out={tmp}/s.npz"]
GOOD_SPEC = {"weights": [1, 1], "means": [[0.0, 0.0], [1.0, 1.0]], "stds": [[0.1, 0.1], [0.1, 0.1]]}


def spec_case(id_, expect, **change):
    spec = {**GOOD_SPEC, **change}
    return Case(f"spec-{id_}", "run", [*FAST, "teacher.spec={tmp}/spec.json", "out={tmp}/new"], expect,
                files={"spec.json": json.dumps(spec)})


DAMAGED = [  # (id, damage, expected fragment) for resuming with core.run
    ("weights-truncated", truncate(f"{CKPT}/weights.safetensors"), "weights.safetensors: truncated"),
    ("weights-4-bytes", truncate(f"{CKPT}/weights.safetensors", 4), "truncated (4 bytes)"),
    ("weights-empty", truncate(f"{CKPT}/weights.safetensors", 0), "truncated (0 bytes)"),
    ("weights-torch-pickle", write(f"{CKPT}/weights.safetensors", torch_pickle), "never unpickles"),
    ("weights-raw-pickle", write(f"{CKPT}/weights.safetensors", PICKLE), "never unpickles"),
    ("weights-missing", remove(f"{CKPT}/weights.safetensors"), "missing file"),
    ("weights-a-directory", directory(f"{CKPT}/weights.safetensors"), "is a directory"),
    ("state-tensors-truncated", truncate(f"{CKPT}/state.safetensors"), "state.safetensors: truncated"),
    ("state-json-truncated", truncate(f"{CKPT}/state.json"), "state.json: not valid JSON"),
    ("state-json-a-list", write(f"{CKPT}/state.json", "[]"), "lacks the step or the optimizer state"),
    ("state-json-no-optimizers", write(f"{CKPT}/state.json", '{"step": 2}'), "lacks the step"),
    ("state-json-missing", remove(f"{CKPT}/state.json"), "missing file"),
    ("latest-to-missing-step", write("checkpoints/latest.json", '{"step": 7, "dir": "step-00000007"}'),
     "points at step-00000007, which does not exist"),
    ("latest-truncated", truncate("checkpoints/latest.json"), "latest.json: not valid JSON"),
    ("latest-wrong-fields", write("checkpoints/latest.json", '{"step": "two"}'), "should hold"),
    ("latest-a-list", write("checkpoints/latest.json", "[1, 2]"), "should hold"),
    ("checkpoint-dir-missing", remove(CKPT), "which does not exist"),
    ("another-size-checkpoint", replace_dir(CKPT, "wide"), "was written by another config (student."),
    ("another-size-weights", replace_dir(f"{CKPT}/weights.safetensors", "wide"), "shape [32"),
    ("another-objective-checkpoint", replace_dir(CKPT, "dmd2"), "was written by another config"),
    ("another-objective-state", replace_dir(f"{CKPT}/state.json", "dmd2"), "another objective's checkpoint"),
    ("config-yaml-binary", write("config.yaml", b"\x89PNG\r\n\x1a\n\x00\xff\xfe"), "not a text file"),
    ("config-yaml-garbage", write("config.yaml", "teacher: [unclosed\n  : -"), "not valid YAML"),
    ("config-yaml-a-list", write("config.yaml", "- 1\n- 2\n"), "holds no run config"),
    ("config-yaml-other-run", write("config.yaml", lambda r: open(os.path.join(r["wide"], "config.yaml")).read()),
     "holds a run with a different config"),
]

SAMPLE_DAMAGED = [  # (id, damage, expected fragment) for core.sample run=
    ("student-truncated", truncate("student.safetensors"), "student.safetensors: truncated"),
    ("student-empty", truncate("student.safetensors", 0), "truncated (0 bytes)"),
    ("student-torch-pickle", write("student.safetensors", torch_pickle), "never unpickles"),
    ("student-raw-pickle", write("student.safetensors", PICKLE), "never unpickles"),
    ("student-another-size", replace_dir("student.safetensors", "wide"), "was written by another config"),
    ("student-a-directory", directory("student.safetensors"), "is a directory"),
    ("no-student-checkpoint-truncated", both(remove("student.safetensors"), truncate(f"{CKPT}/weights.safetensors")),
     "truncated"),
    ("no-student-latest-to-missing", both(remove("student.safetensors"),
                                          write("checkpoints/latest.json", '{"step": 9, "dir": "step-00000009"}')),
     "which does not exist"),
    ("no-student-no-checkpoint", both(remove("student.safetensors"), remove("checkpoints")), "no checkpoint yet"),
    ("no-student-another-size", both(remove("student.safetensors"), replace_dir(CKPT, "wide")), "another config"),
    ("meta-missing", remove("meta.json"), "missing file"),
    ("meta-truncated", truncate("meta.json"), "meta.json: not valid JSON"),
    ("meta-no-sampling", write("meta.json", '{"data_shape": [2]}'), "lacks the sampling spec"),
    ("meta-bad-sampling", write("meta.json", '{"sampling": {"nonsense": 1}}'), "bad sampling spec"),
    ("config-missing", remove("config.yaml"), "not a fewstep run"),
    ("config-binary", write("config.yaml", b"\x00\xff\xfe\xfd"), "not a text file"),
    ("config-garbage", write("config.yaml", "a: [b\n c: -"), "not valid YAML"),
    ("config-a-string", write("config.yaml", "just words\n"), "holds no run config"),
    ("config-unknown-teacher", write("config.yaml", "teacher: gmn\nobjective: denoise\n"), "unknown teacher 'gmn'"),
    ("config-bad-value", write("config.yaml", "objective: denoise\ntrain: {steps: -1}\n"), "train.steps: must be > 0"),
]

CASES: list[Case] = [
    *float_cases(),
    *[Case(f"resume-{i}", "run", RESUME, e, damage=d) for i, d, e in DAMAGED],
    *[Case(f"sample-{i}", "sample", SAMPLE_RUN, e, damage=d) for i, d, e in SAMPLE_DAMAGED],
    # -- core.run: keys and values
    Case("out-sub-key", "run", ["out.x=1"], "out takes one value"),
    Case("seed-sub-key", "run", ["seed.x=1"], "seed takes one value"),
    Case("train-a-value", "run", ["train=fast"], "train takes train.FIELD=VALUE"),
    Case("critic-init-bogus", "run", ["objective=dmd2", "critic.init=bogus", "out={tmp}/new"],
         "critic.init: must be one of auto, teacher, student, fresh, got 'bogus'"),
    Case("dm-t-range-nan", "run", ["objective=dmd2", "objective.dm_t_range=[nan,0.9]", "out={tmp}/new"],
         "objective.dm_t_range: expected a finite number"),
    Case("timesteps-inf", "run", ["objective=dmd2", "objective.timesteps=[inf]", "out={tmp}/new"],
         "expected a finite number"),
    Case("fourier-features-odd", "run", ["student.fourier_features=3", "out={tmp}/new"],
         "student.fourier_features: must be an even number >= 0"),
    Case("nfe-emb-dim-odd", "run", ["objective=sfd-v", "student=copy-nfe", "student.emb_dim=33", "out={tmp}/new"],
         "student.emb_dim: must be an even number > 0"),
    Case("steps-zero", "run", ["train.steps=0"], "train.steps: must be > 0"),
    Case("steps-float", "run", ["train.steps=2.5"], "train.steps: expected an integer"),
    Case("steps-nan", "run", ["train.steps=nan"], "train.steps: expected an integer"),
    Case("batch-empty", "run", ["train.batch="], "train.batch: expected an integer"),
    Case("parallel-bogus", "run", ["train.parallel=dp"], "train.parallel: must be one of"),
    Case("precision-bogus", "run", ["train.precision=fp8"], "train.precision: must be one of"),
    Case("seed-float", "run", ["seed=1.5"], "seed: expected an integer"),
    Case("unknown-top-key", "run", ["trian.steps=3"], "unknown key 'trian' (did you mean 'train'?)"),
    Case("unknown-train-key", "run", ["train.setps=3"], "unknown key 'train.setps'"),
    Case("no-equals", "run", ["objective"], "expected key=value"),
    Case("malformed-key", "run", ["train..steps=3"], "malformed key"),
    Case("sampler-in-training", "run", ["sampler=euler"], "sampler= is not a training setting"),
    Case("nan-policy-typo", "run", ["train.nan_policy=ignore"], "train.nan_policy: must be one of stop, skip"),
    Case("unknown-data", "run", ["data=nope"], "unknown dataset 'nope'"),
    Case("unknown-callback", "run", ["callbacks=nope"], "unknown callback 'nope'"),
    Case("critic-without-need", "run", ["objective=denoise", "critic=fake-score"], "uses no critic"),
    Case("preset-typo", "run", ["teacher.preset=ring9"], "unknown gmm preset 'ring9'"),
    Case("schedule-typo", "run", [*FAST, "teacher.schedule=edn", "out={tmp}/new"], "unknown schedule 'edn'"),
    Case("sigma-order", "run", ["teacher.sigma_min=100"], "must be below sigma_max"),
    Case("sigma-negative", "run", ["teacher.sigma_min=-1"], "teacher.sigma_min: must be > 0"),
    # -- config= files
    Case("config-png", "run", ["config={tmp}/img.png"], "not a text file",
         files={"img.png": b"\x89PNG\r\n\x1a\n\0\xff"}),
    Case("config-directory", "run", ["config={tmp}"], "a directory"),
    Case("config-train-list", "run", ["config={tmp}/c.yaml"], "'train' holds [1, 2]",
         files={"c.yaml": "train: [1, 2]\n"}),
    Case("config-bad-yaml", "run", ["config={tmp}/c.yaml"], "not valid YAML", files={"c.yaml": "a: [b\n  c: -"}),
    Case("config-a-list", "run", ["config={tmp}/c.yaml"], "holds a list", files={"c.yaml": "- 1\n- 2\n"}),
    Case("config-missing", "run", ["config={tmp}/none.yaml"], "no such file"),
    Case("config-sub-key", "run", ["config.x=1"], "config= takes a path"),
    Case("config-unknown-key", "run", ["config={tmp}/c.yaml"], "unknown key 'bogus'", files={"c.yaml": "bogus: 1\n"}),
    Case("config-nan-lr", "run", ["config={tmp}/c.yaml"], "train.lr: expected a finite number",
         files={"c.yaml": "train: {lr: .nan}\n"}),
    # -- output paths
    Case("out-unknown-protocol", "run", [*FAST, "out=s3x://bucket/run"], "Protocol not known: s3x"),
    Case("out-protocol-not-installed", "run", [*FAST, "out=s3://bucket/run"], "not installed"),
    Case("out-is-a-file", "run", [*FAST, "out={tmp}/f.txt"], "out=", files={"f.txt": "hello"}),
    Case("out-not-a-run", "run", [*FAST, "out={tmp}"], "is not a fewstep run", files={"keep.txt": "precious"}),
    # -- mixture specs
    spec_case("nan-mean", "'means' holds NaN or inf", means=[[float("nan"), 0.0], [1.0, 1.0]]),
    spec_case("inf-std", "'stds' holds NaN or inf", stds=[[1e999, 0.1], [0.1, 0.1]]),
    spec_case("nan-weight", "'weights' holds NaN or inf", weights=[float("nan"), 1]),
    spec_case("negative-std", "every std must be > 0", stds=[[-0.1, 0.1], [0.1, 0.1]]),
    spec_case("zero-std", "every std must be > 0", stds=[[0.0, 0.1], [0.1, 0.1]]),
    spec_case("zero-weights", "positive sum", weights=[0, 0]),
    spec_case("negative-weight", "weights must be >= 0", weights=[-1, 2]),
    spec_case("ragged-means", "not a rectangular array", means=[[0.0, 0.0], [1.0]]),
    spec_case("dims-mismatch", "need K weights and K x D", stds=[[0.1], [0.1]]),
    spec_case("k-mismatch", "need K weights and K x D", weights=[1, 1, 1]),
    spec_case("weights-2d", "need K weights and K x D", weights=[[1, 1]]),
    spec_case("empty", "need K weights", weights=[], means=[], stds=[]),
    spec_case("strings", "not a rectangular array of numbers", means="abc"),
    spec_case("classes-short", "'classes' must list one integer", classes=[0]),
    spec_case("classes-negative", "'classes' must list one integer", classes=[0, -1]),
    spec_case("classes-float", "'classes' must list one integer", classes=[0, 1.5]),
    Case("class-probs-negative", "run", [*FAST, "teacher.preset=cls4", "data.class_probs=[-1,1,1,1]", "out={tmp}/new"],
         "need 4 values >= 0 with a positive sum"),
    Case("class-probs-zero", "run", [*FAST, "teacher.preset=cls4", "data.class_probs=[0,0,0,0]", "out={tmp}/new"],
         "need 4 values >= 0"),
    Case("class-probs-length", "run", [*FAST, "teacher.preset=cls4", "data.class_probs=[1,1]", "out={tmp}/new"],
         "need 4 values"),
    Case("class-probs-unconditional", "run", [*FAST, "data.class_probs=[1,1]", "out={tmp}/new"],
         "this mixture has no classes"),
    Case("class-probs-nan", "run", [*FAST, "teacher.preset=cls4", "data.class_probs=[nan,1,1,1]", "out={tmp}/new"],
         "data.class_probs: expected a finite number"),
    Case("spec-missing-keys", "run", [*FAST, "teacher.spec={tmp}/s.json", "out={tmp}/new"], "lacks weights",
         files={"s.json": '{"weights": [1]}'}),
    Case("spec-not-json", "run", [*FAST, "teacher.spec={tmp}/s.json", "out={tmp}/new"], "not valid JSON",
         files={"s.json": "{weights"}),
    Case("spec-a-list", "run", [*FAST, "teacher.spec={tmp}/s.json", "out={tmp}/new"], "lacks weights",
         files={"s.json": "[1, 2]"}),
    Case("spec-missing", "run", [*FAST, "teacher.spec={tmp}/nope.json", "out={tmp}/new"], "missing file"),
    # -- plugins filtered by the environment
    Case("env-plugins-typo", "run", ["out={tmp}/new"], "FEWSTEP_PLUGINS=dmd", env={"FEWSTEP_PLUGINS": "dmd"}),
    Case("env-plugins-empty", "run", ["out={tmp}/new"], "FEWSTEP_PLUGINS=", env={"FEWSTEP_PLUGINS": ""}),
    Case("env-disable-gmm", "run", ["out={tmp}/new"], "FEWSTEP_DISABLE_PLUGINS skips gmm",
         env={"FEWSTEP_DISABLE_PLUGINS": "gmm"}),
    Case("env-sample-typo", "sample", ["teacher=gmm"], "FEWSTEP_PLUGINS=gmmm", env={"FEWSTEP_PLUGINS": "gmmm"}),
    # -- core.run help / list
    Case("help-unknown-objective", "run", ["help", "objective=nope"], "unknown objective 'nope'"),
    Case("help-bad-override", "run", ["help", "objective"], "expected key=value"),
    Case("help-config-missing", "run", ["help", "config={tmp}/none.yaml"], "no such file"),
    Case("list-extra-argument", "run", ["list", "objective=dmd2"], "list takes no arguments"),
    # -- core.sample
    Case("sample-num-zero", "sample", ["teacher=gmm", "num=0"], "num must be > 0"),
    Case("sample-num-negative", "sample", ["teacher=gmm", "num=-3"], "num must be > 0"),
    Case("sample-num-text", "sample", ["teacher=gmm", "num=many"], "num: expected an integer"),
    Case("sample-steps-zero", "sample", ["teacher=gmm", "steps=0"], "steps must be > 0"),
    Case("sample-steps-float", "sample", ["teacher=gmm", "steps=1.5"], "steps: expected an integer"),
    Case("sample-batch-zero", "sample", ["teacher=gmm", "batch=0", "out={tmp}/s.npz"], "batch must be > 0"),
    Case("sample-guidance-nan", "sample", ["teacher=gmm", "guidance=nan"], "guidance: expected a finite number"),
    Case("sample-guidance-inf", "sample", ["teacher=gmm", "guidance=inf"], "guidance: expected a finite number"),
    Case("sample-seed-text", "sample", ["teacher=gmm", "seed=x"], "seed: expected an integer"),
    Case("sample-out-txt", "sample", ["teacher=gmm", "out={tmp}/x.txt"], "expected a .npz path"),
    Case("sample-out-no-dir", "sample", ["teacher=gmm", "out={tmp}/no/such/x.npz"], "does not exist"),
    Case("sample-out-protocol", "sample", ["teacher=gmm", "out=s3x://b/x.npz"], "Protocol not known"),
    Case("sample-run-protocol", "sample", ["run=s3x://b/run"], "Protocol not known"),
    Case("sample-run-missing", "sample", ["run={tmp}/none"], "is not a fewstep run"),
    Case("sample-run-extra-key", "sample", ["run={run}", "teacher=gmm"], "with run= only"),
    Case("sample-nothing", "sample", ["num=10"], "give run=RUN_DIR"),
    Case("sample-sampler-typo", "sample", ["teacher=gmm", "sampler=eulr"], "unknown sampler 'eulr'"),
    Case("sample-teacher-typo", "sample", ["teacher=gmn"], "unknown teacher 'gmn'"),
    Case("sample-label-unconditional", "sample", ["teacher=gmm", "label=3", "out={tmp}/s.npz"], "no classes"),
    Case("sample-label-too-big", "sample", ["teacher=gmm", "teacher.preset=cls4", "label=4", "out={tmp}/s.npz"],
         "use 0..3"),
    Case("sample-label-negative", "sample", ["teacher=gmm", "teacher.preset=cls4", "label=-2", "out={tmp}/s.npz"],
         "use 0..3"),
    Case("sample-prompt-gmm", "sample", ["teacher=gmm", "prompt=a cat", "out={tmp}/s.npz"], "takes no prompts"),
    Case("sample-device", "sample", ["teacher=gmm", "device=gpu"], "device"),
    Case("sample-grid-typo", "sample", ["teacher=gmm", "grid=polynomal", "out={tmp}/s.npz"], "polynomal"),
    Case("sample-config-png", "sample", ["config={tmp}/img.png"], "not a text file",
         files={"img.png": b"\x89PNG\0\xff"}),
    Case("sample-spec-nan", "sample", ["teacher=gmm", "teacher.spec={tmp}/s.json", "out={tmp}/s.npz"],
         "holds NaN", files={"s.json": json.dumps({**GOOD_SPEC, "means": [[float("nan"), 0], [1, 1]]})}),
    # -- core.metrics
    Case("metrics-one-file", "metrics", ["{a}"], "expected two .npz files"),
    Case("metrics-three-files", "metrics", ["{a}", "{b}", "{a}"], "expected two .npz files"),
    Case("metrics-missing", "metrics", ["{a}", "{tmp}/none.npz"], "missing samples file"),
    Case("metrics-directory", "metrics", ["{a}", "{tmp}"], "is a directory"),
    Case("metrics-text", "metrics", ["{a}", "{tmp}/t.npz"], "not a readable .npz", files={"t.npz": "hello"}),
    Case("metrics-truncated", "metrics", ["{a}", "{tmp}/t.npz"], "not a readable .npz",
         files={"t.npz": lambda r: open(r["b"], "rb").read()[:100]}),
    Case("metrics-wrong-key", "metrics", ["{a}", "{tmp}/k.npz"], "has no 'samples' array (it has: x)",
         files={"k.npz": lambda r: _npz(x=np.zeros((4, 2)))}),
    Case("metrics-wrong-dims", "metrics", ["{a}", "{tmp}/d.npz"], "holds samples of shape (2,)",
         files={"d.npz": lambda r: _npz(samples=np.zeros((8, 3)))}),
    Case("metrics-1d", "metrics", ["{a}", "{tmp}/d.npz"], "numeric N x D array",
         files={"d.npz": lambda r: _npz(samples=np.zeros(8))}),
    Case("metrics-empty", "metrics", ["{a}", "{tmp}/e.npz"], "has 0 row(s)",
         files={"e.npz": lambda r: _npz(samples=np.zeros((0, 2)))}),
    Case("metrics-one-row", "metrics", ["{a}", "{tmp}/e.npz"], "has 1 row(s)",
         files={"e.npz": lambda r: _npz(samples=np.zeros((1, 2)))}),
    Case("metrics-nan", "metrics", ["{a}", "{tmp}/n.npz"], "holds NaN or inf (1 values)",
         files={"n.npz": lambda r: _npz(samples=np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]))}),
    Case("metrics-inf", "metrics", ["{tmp}/n.npz", "{b}"], "holds NaN or inf",
         files={"n.npz": lambda r: _npz(samples=np.array([[0.0, 1.0], [np.inf, 2.0]]))}),
    Case("metrics-strings", "metrics", ["{a}", "{tmp}/s.npz"], "numeric N x D array",
         files={"s.npz": lambda r: _npz(samples=np.array([["a", "b"], ["c", "d"]]))}),
    Case("metrics-object-array", "metrics", ["{a}", "{tmp}/o.npz"], "not a readable .npz",
         files={"o.npz": lambda r: _npz(samples=np.array([{"x": 1}, None], dtype=object))}),
    Case("metrics-protocol", "metrics", ["{a}", "s3x://b/x.npz"], "Protocol not known"),
]


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def prepare(case: Case, runs: dict, tmp) -> list[str]:
    tmp = str(tmp)
    run = os.path.join(tmp, "run")
    if any("{run}" in a for a in case.argv):
        shutil.copytree(runs["good"], run)
        if case.damage is not None:
            case.damage(run, runs)
    for name, data in case.files.items():
        payload = data(runs) if callable(data) else data
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(payload if isinstance(payload, bytes) else payload.encode())
    return [a.format(run=run, tmp=tmp, a=runs["a"], b=runs["b"]) for a in case.argv]


@pytest.fixture
def registry_env(monkeypatch):
    """Apply a case's environment to a fresh registry; the process-wide one comes back afterwards."""
    saved = get_registry()

    def apply(env: dict):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        set_registry(None)

    yield apply
    set_registry(saved)


def test_battery_is_large_enough():
    assert len(CASES) >= 120 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, runs, tmp_path, capsys, monkeypatch, registry_env):
    monkeypatch.chdir(tmp_path)  # relative defaults (samples.npz, runs/...) land here, and are checked
    argv = prepare(case, runs, tmp_path)
    if case.env:
        registry_env(case.env)
    before = snapshot(tmp_path, runs["root"])
    capsys.readouterr()
    assert MAINS[case.entry](argv) == 2
    assert_one_error_line(capsys.readouterr().err, case.expect)
    assert snapshot(tmp_path, runs["root"]) == before


# -- real processes --------------------------------------------------------------------------------
def _process(module: str, *argv: str, **env):
    full = {**os.environ, "FEWSTEP_TENSORBOARD": "0", **env}
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=full)


@pytest.mark.parametrize("module,argv,expect", [
    ("core.run", ["objective.lr=nan"], "objective.lr: expected a finite number"),
    ("core.sample", ["run=/no/such/run"], "is not a fewstep run"),
    ("core.metrics", ["/no/such/a.npz", "/no/such/b.npz"], "missing samples file"),
], ids=["run", "sample", "metrics"])
def test_real_entry_points_exit_2_with_one_line(module, argv, expect):
    res = _process(module, *argv)
    assert res.returncode == 2, res.stderr
    assert_one_error_line(res.stderr, expect)


def test_debug_shows_the_traceback():
    for env, argv in (({"FEWSTEP_DEBUG": "1"}, ["train.steps=0"]), ({}, ["train.steps=0", "--debug"])):
        res = _process("core.run", *argv, **env)
        assert res.returncode == 2 and "Traceback" in res.stderr, res.stderr
        assert res.stderr.rstrip().splitlines()[-1].startswith("fewstep: error: train.steps: must be > 0")


def test_a_bug_keeps_its_traceback(tmp_path):
    """Not every failure is the user's: an unexpected exception is not disguised as a one-line error."""
    code = ("import sys; from core.cli import guard\n"
            "@guard\ndef main(argv): return {}['bug']\nsys.exit(main([]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" in res.stderr and "KeyError" in res.stderr
