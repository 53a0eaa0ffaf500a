"""Checkpoint state: the learning-rate schedule against its closed form, and the RNG stream, optimizer moments, EMA
and LR schedule restored exactly when a run resumes (in-process, so that mutation runs see it)."""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_config, train
from core import files
from core.runner import Trainer
import core.checkpoint as ckpt
from core.checkpoint import CheckpointStore, load_modules, load_optimizers
from core.errors import CheckpointError, UsageError
from core.runstate import lr_factor, make_optimizer

FAST = ["objective=denoise", "train.batch=16", "train.eval_every=0", "train.preview_every=0", "student.hidden=16",
        "student.depth=1", "student.emb_dim=8", "train.ema=0.5", "train.log_every=1"]


@pytest.mark.parametrize("decay", ["none", "linear", "cosine"])
def test_lr_factor_closed_form(decay):
    warmup, total = 4, 14
    for it in range(0, 20):
        if it < warmup:
            expect = (it + 1) / warmup
        else:
            frac = (it - warmup) / (total - warmup)
            expect = {"none": 1.0, "linear": max(0.0, 1 - frac),
                      "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))}[decay]
        assert lr_factor(it, warmup, total, decay) == pytest.approx(expect, abs=1e-12), (it, decay)
    # no warm-up: decay starts at iteration 0; total == warmup does not divide by zero
    assert lr_factor(0, 0, 10, "linear") == 1.0 and lr_factor(5, 0, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(3, 3, 3, "linear") == 1.0 and lr_factor(4, 3, 3, "linear") == 0.0


def _latest(out):
    d = files.read_json(out / "checkpoints" / "latest.json")["dir"]
    return load_file(out / "checkpoints" / d / "state.safetensors"), load_file(out / "checkpoints" / d / "weights.safetensors")


def test_restore_sets_the_saved_rng_stream_lr_and_moments(tmp_path):
    out = tmp_path / "run"
    args = [*FAST, "train.warmup=3", "train.lr_decay=linear", "train.ckpt_every=4", f"out={out}"]
    train(*args, "train.steps=4")
    state, weights = _latest(out)
    trainer = Trainer(run_config(*args, "train.steps=10"))
    trainer.build()
    torch.manual_seed(12345)  # anything but the saved stream
    assert trainer.state.restore() == 4
    assert torch.equal(torch.get_rng_state(), state["rng.cpu"])
    for name, w in weights.items():  # student and EMA weights
        prefix, key = name.split(".", 1)
        assert torch.equal(trainer.state.modules[prefix].state_dict()[key], w), name
    opt = trainer.state.optimizers["denoiser"]
    moments = [v for k, v in sorted(state.items()) if k.startswith("opt.denoiser")]
    restored = [t for s in opt.state_dict()["state"].values() for t in s.values() if torch.is_tensor(t)]
    assert moments and sum(float(m.double().abs().sum()) for m in moments) == pytest.approx(
        sum(float(r.double().abs().sum()) for r in restored))
    # the schedule continues at iteration 4 of a 10-step run: linear decay after 3 warm-up iterations
    base = opt.param_groups[0]["initial_lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(base * lr_factor(4, 3, 10, "linear"))
    assert "ema" in trainer.state.modules
    # state.json: the step, and the sampling spec the run writes to meta.json (docs/distributed.md)
    saved = files.read_json(out / "checkpoints" / "step-00000004" / "state.json")
    assert saved["step"] == 4 and saved["spec"] == files.read_json(out / "meta.json")["sampling"]


def test_resume_continues_the_random_stream(tmp_path):
    """The noise a resumed run draws after the checkpoint is the noise the uninterrupted run drew."""
    args = [*FAST, "train.ckpt_every=3"]
    train(*args, "train.steps=6", f"out={tmp_path / 'full'}")
    train(*args, "train.steps=3", f"out={tmp_path / 'split'}")
    train(*args, "train.steps=6", f"out={tmp_path / 'split'}")
    full, split = _latest(tmp_path / "full"), _latest(tmp_path / "split")
    for a, b in zip(full, split):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_fresh_run_starts_at_zero(tmp_path):
    trainer = Trainer(run_config(*FAST, "train.steps=2", f"out={tmp_path / 'new'}"))
    trainer.build()
    assert trainer.state.restore() == 0


def test_optimizers_of_another_objective_are_refused():
    optimizers = {"student": torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])}
    state = {"optimizers": {"student": {}, "critic": {}}}
    with pytest.raises(CheckpointError, match=r"^RUN/ckpt: holds optimizers for phases \['critic', 'student'\], "
                                              r"this run has \['student'\] \(another objective's checkpoint\); "):
        load_optimizers(optimizers, state, {}, "RUN/ckpt:")


def test_a_checkpoint_of_another_network_names_the_keys_that_differ():
    modules = {"student": torch.nn.Linear(2, 3), "ema": torch.nn.Linear(2, 3)}
    weights = {"student.weight": torch.zeros(4, 2), **{f"extra{i}": torch.zeros(1) for i in range(5)}}
    with pytest.raises(CheckpointError, match=re.escape(
            "RUN/ckpt: was written by another config (student.weight: shape [4, 2] in the file, [3, 2] here; "
            "missing student.bias, ema.weight, ema.bias; unexpected extra0, extra1, extra2 ...); resume with the "
            "run's own settings")):
        load_modules(modules, weights, "RUN/ckpt:")
    del weights["extra3"], weights["extra4"]
    with pytest.raises(CheckpointError, match=re.escape("; unexpected extra0, extra1, extra2); resume")):
        load_modules(modules, weights, "RUN/ckpt:")


def test_a_failed_save_leaves_no_step_directory_and_the_last_good_latest(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path))
    store.save(1, {"w": torch.zeros(2)}, {}, {"step": 1})
    write_json = ckpt.write_json

    def failing(url, obj):
        if url.endswith("state.json"):
            raise OSError("disk full")
        write_json(url, obj)

    monkeypatch.setattr(ckpt, "write_json", failing)
    with pytest.raises(OSError, match="disk full"):
        store.save(2, {"w": torch.ones(2)}, {}, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-00000001"]
    assert store.latest()["dir"] == "step-00000001"


def test_broken_checkpoint_directories_are_named_with_the_fix(tmp_path):
    store, root = CheckpointStore(str(tmp_path)), tmp_path / "checkpoints"
    store.save(1, {"w": torch.zeros(2)}, {}, {"step": 1, "optimizers": {}})
    step_dir = root / "step-00000001"
    (step_dir / "state.json").write_text('{"optimizers": {}}')
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{step_dir}/state.json lacks the step or the optimizer "
                                                              "state; point checkpoints/latest.json at an older")):
        store.load()
    (root / "latest.json").write_text('{"step": 9, "dir": "step-00000009"}')
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{root}/latest.json points at step-00000009, which does "
                                                              "not exist; point it at an existing step-* directory, "
                                                              "or start afresh with another out=")):
        store.load()
    (root / "latest.json").write_text('{"step": 9}')
    with pytest.raises(CheckpointError, match=re.escape("got {'step': 9}; point it at an existing step-* directory, "
                                                        "or start afresh with another out=") + "$"):
        store.latest()
    (root / "latest.json").write_text('{"step": 1, "dir": "step-00000001", "format": "dcp"}')
    with pytest.raises(ValueError, match="^sharded checkpoint: use CheckpointStore.load_sharded$"):
        store.load()


def test_optimizers_take_each_phases_settings_and_ema_zero_keeps_no_copy(tmp_path):
    trainer = Trainer(run_config("objective=mm", "teacher=gmm", "train.ema=0", "student.hidden=16", "student.depth=1",
                                 "student.emb_dim=8", f"out={tmp_path / 'mm'}"))
    trainer.build()
    assert "ema" not in trainer.state.modules
    for phase in trainer.phases:  # moment matching's Adam: beta1 = 0, beta2 = 0.99, eps = 1e-12
        (group,) = trainer.state.optimizers[phase.name].param_groups
        assert (group["betas"], group["eps"]) == ((0.0, 0.99), 1e-12)


def test_checkpoints_keep_the_last_two_by_default(tmp_path):
    store = CheckpointStore(str(tmp_path))
    for step in (1, 2, 3):
        store.save(step, {"w": torch.zeros(1)}, {}, {"step": step, "optimizers": {}})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-00000002",
                                                                             "step-00000003"]


def test_the_8bit_optimizer_without_bitsandbytes_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not importable
    with pytest.raises(UsageError, match=re.escape("train.optimizer=adamw8bit needs bitsandbytes: pip install "
                                                   "bitsandbytes (or use train.optimizer=adamw)")):
        make_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(1))], torch.device("cpu"), lr=1e-3)


def test_optimizer_state_with_plain_values_round_trips():
    """Tensors go to safetensors, everything else (an int step, a flag, a None) stays in state.json."""
    state = {"state": {0: {"step": 3, "exp_avg": torch.arange(3.0), "flag": None},
                       2: {"momentum_buffer": torch.ones(2), "count": 1.5}},
             "param_groups": [{"lr": 0.1, "params": [0, 2]}]}
    tensors, structure = ckpt.flatten_optimizer("opt.x", state)
    assert sorted(tensors) == ["opt.x.0.exp_avg", "opt.x.2.momentum_buffer"]
    assert structure["state"] == {"0": {"step": 3, "exp_avg": {"tensor": "opt.x.0.exp_avg"}, "flag": None},
                                  "2": {"momentum_buffer": {"tensor": "opt.x.2.momentum_buffer"}, "count": 1.5}}
    back = ckpt.unflatten_optimizer(structure, tensors)
    assert back["param_groups"] == state["param_groups"] and back["state"].keys() == {0, 2}
    assert back["state"][0]["step"] == 3 and back["state"][0]["flag"] is None and back["state"][2]["count"] == 1.5
    assert torch.equal(back["state"][0]["exp_avg"], torch.arange(3.0))
    # a plain dict value without a "tensor" key is kept as it is
    assert ckpt.unflatten_optimizer({"state": {"1": {"meta": {"k": 2}}}, "param_groups": []}, {})["state"] == {
        1: {"meta": {"k": 2}}}


def test_more_missing_keys_than_the_limit_end_with_an_ellipsis():
    modules = {"student": torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))}
    with pytest.raises(CheckpointError, match=re.escape(
            "(missing student.0.weight, student.0.bias, student.1.weight ...); resume")):
        load_modules(modules, {}, "RUN/ckpt:")


def test_optimizer_state_that_does_not_fit_names_the_phase():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    saved = {"optimizers": {"critic": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}}
    with pytest.raises(CheckpointError, match="^" + re.escape(
            "RUN/state.json: optimizer state of phase 'critic' does not fit this run (") + ".*" + re.escape(
            "); resume with the run's own settings (config=RUN/config.yaml), or start afresh with another out=")):
        load_optimizers({"critic": opt}, saved, {}, "RUN/state.json")


def test_a_failed_save_over_an_existing_step_keeps_that_step(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path))
    store.save(1, {"w": torch.zeros(2)}, {}, {"step": 1})
    monkeypatch.setattr(ckpt, "write_json", lambda url, obj: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        store.save(1, {"w": torch.ones(2)}, {}, {"step": 1})
    assert (tmp_path / "checkpoints" / "step-00000001").is_dir()


def test_schedules_moved_before_any_optimizer_step_warn_nothing(tmp_path, recwarn):
    trainer = Trainer(run_config(*FAST, "train.steps=4", f"out={tmp_path / 'run'}"))
    trainer.build()
    trainer.state.step_schedules(to=2)
    trainer.state.step_schedules()
    assert [str(w.message) for w in recwarn] == []
    assert trainer.state.schedules["denoiser"].last_epoch == 3


def test_the_8bit_optimizer_gets_the_parameters_and_settings(monkeypatch):
    made = []
    optim = type("optim", (), {"AdamW8bit": staticmethod(lambda params, **hyper: made.append((params, hyper)))})
    monkeypatch.setitem(sys.modules, "bitsandbytes", type("bnb", (), {"optim": optim}))
    params = [torch.nn.Parameter(torch.zeros(1))]
    make_optimizer("adamw8bit", params, torch.device("cpu"), lr=1e-3, betas=(0.0, 0.99))
    assert made == [(params, {"lr": 1e-3, "betas": (0.0, 0.99)})]


@pytest.mark.parametrize("device,fused", [("cuda", True), ("cpu", None)])
def test_adamw_is_fused_on_cuda(device, fused):
    opt = make_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], torch.device(device), lr=1e-3)
    assert opt.defaults.get("fused") is fused


def test_the_ema_copy_is_frozen_and_a_phase_needs_its_networks(tmp_path, monkeypatch):
    trainer = Trainer(run_config(*FAST, "train.steps=2", f"out={tmp_path / 'run'}"))
    trainer.build()
    assert not any(p.requires_grad for p in trainer.state.ema.parameters())
    from core.protocols import Phase
    from core.runstate import RunState

    with pytest.raises(UsageError, match="^" + re.escape("objective phase 'critic' trains ['critic'], which this "
                                                         "run does not have (it has ['student'])") + "$"):
        RunState(trainer.cfg, trainer.networks, [Phase("critic", trains="critic")], trainer.parallel, trainer.log)


def test_a_resumed_checkpoint_that_does_not_fit_names_its_file(tmp_path):
    out = tmp_path / "run"
    args = [*FAST, "train.ckpt_every=2", f"out={out}"]
    train(*args, "train.steps=2")
    d = out / "checkpoints" / "step-00000002"
    state = files.read_json(d / "state.json")
    files.write_json(str(d / "state.json"), {**state, "optimizers": {"other": {}}})
    trainer = Trainer(run_config(*args, "train.steps=4"))
    trainer.build()
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{d}/state.json holds optimizers for phases ['other']")):
        trainer.state.restore()
    files.write_json(str(d / "state.json"), state)
    weights = load_file(d / "weights.safetensors")
    ckpt.save_tensors(str(d / "weights.safetensors"), {k: v for k, v in weights.items() if not k.startswith("ema.")})
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{d}/weights.safetensors was written by another config")):
        trainer.state.restore()


def test_the_ema_copies_the_student_before_ema_start_and_averages_after():
    from core.protocols import Phase
    from core.runstate import EMA

    student, ema = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()  # ema starts elsewhere
    rule, decay, start = EMA(ema, student, 0.9, start=3), 0.9, 3
    reference = [p.detach().clone() for p in ema.parameters()]
    gen = torch.Generator().manual_seed(0)
    for it in range(7):
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        rule.fewstep_after_phase(None, Phase("critic", trains=("critic",)), it, {})  # not the student's: no update
        rule.fewstep_after_phase(None, Phase("generator", trains=("student",)), it, {})
        reference = [s.detach().clone() if it < start else decay * r + (1 - decay) * s.detach()
                     for r, s in zip(reference, student.parameters())]
        for r, e in zip(reference, ema.parameters()):
            torch.testing.assert_close(e, r, rtol=1e-12, atol=1e-12)


def test_a_run_that_ends_before_ema_start_samples_the_student_itself(tmp_path):
    out = tmp_path / "run"
    train(*FAST, "train.steps=3", "train.ema_start=3", f"out={out}")
    _, weights = _latest(out)
    student = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith("student.")}
    ema = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith("ema.")}
    assert student.keys() == ema.keys() and student
    assert all(torch.equal(student[k], ema[k]) for k in student)
