"""The run's lifecycle hooks (core.hookspecs ``fewstep_*``): a third-party callback plugin, registered like any
plugin, gets its config and sees every event in order, with the losses and optimizer steps the objective's
phases declare; a test probe passed to the Trainer sees the same on every rank."""

import attrs
import pytest
import torch
import yaml

from core import hookimpl
from core.config import parse_overrides
from core.registry import Registry, set_registry
from core.cli import load_tree
from core.run import main as run_main
from core.runconfig import resolve
from core.runner import Trainer


@attrs.define(kw_only=True)
class RecorderConfig:
    tag: str = "recorded"


class Recorder:
    """Records every lifecycle event as (hook, detail)."""

    def __init__(self, config):
        self.config, self.events = config, []

    @hookimpl
    def fewstep_run_start(self, trainer, start):
        self.events.append(("run_start", start))

    @hookimpl
    def fewstep_phase_loss(self, trainer, phase, loss, metrics):
        assert loss.ndim == 0 and isinstance(metrics, dict)
        self.events.append(("phase_loss", phase.name))

    @hookimpl
    def fewstep_before_optimizer_step(self, trainer, phase, optimizer):
        assert optimizer is trainer.optimizers[phase.name]
        self.events.append(("before_step", phase.name))

    @hookimpl
    def fewstep_after_phase(self, trainer, phase, iteration):
        self.events.append(("after_phase", (phase.name, iteration)))

    @hookimpl
    def fewstep_log(self, trainer, record):
        self.events.append(("log", record["step"]))

    @hookimpl
    def fewstep_iteration_end(self, trainer, step):
        self.events.append(("iteration_end", step))

    @hookimpl
    def fewstep_checkpoint(self, trainer, path):
        self.events.append(("checkpoint", path.rstrip("/").rsplit("/", 1)[-1]))

    @hookimpl
    def fewstep_run_end(self, trainer, result):
        self.events.append(("run_end", result["export"] is not None))


class RecorderPlugin:
    built: list = []

    @staticmethod
    @hookimpl
    def register_callbacks(register):
        def factory(config):
            """Record the run's events."""
            recorder = Recorder(config)
            RecorderPlugin.built.append(recorder)
            return recorder

        register("recorder", factory, config=RecorderConfig)


def test_callback_plugin_gets_its_config_and_every_event_in_order(tmp_path):
    registry = Registry()
    registry.add(RecorderPlugin, name="recorder-plugin")
    RecorderPlugin.built.clear()
    # DMD2 with r = 2: the generator phase on even iterations, the critic phase on every one
    cfg = resolve(parse_overrides(["student.hidden=16", "student.depth=1", "train.batch=16", "train.steps=4",
                                   "train.log_every=2", "train.ckpt_every=4", "train.eval_every=0",
                                   "train.preview_every=0", "train.eval_samples=16", "train.progress=false",
                                   "objective.critic_updates=2", "callbacks=[recorder]", f"out={tmp_path}"]),
                  registry)
    Trainer(cfg, registry, log=lambda m: None).train()
    (recorder,) = RecorderPlugin.built
    assert recorder.config == RecorderConfig()
    expected = [("run_start", 0)]
    for it in range(4):
        for phase in (["generator"] if it % 2 == 0 else []) + ["critic"]:
            expected += [("phase_loss", phase), ("before_step", phase), ("after_phase", (phase, it))]
        if (it + 1) % 2 == 0:
            expected.append(("log", it + 1))
        expected.append(("iteration_end", it + 1))
    expected += [("checkpoint", "step-00000004"), ("run_end", True)]
    assert recorder.events == expected


def test_a_probe_passed_to_the_trainer_sees_each_yielded_loss(tmp_path):
    """SFD yields one loss per student step; each is stepped, and the probe sees the gradients before each step."""
    from conftest import train

    teacher = tmp_path / "teacher"
    train("objective=denoise", "teacher=gmm", "teacher.preset=cls4", "student.hidden=16", "student.depth=1",
          "train.steps=1", "train.batch=16", "train.eval_every=0", "train.preview_every=0", "train.eval_samples=16",
          f"out={teacher}")

    class Probe:
        steps, norms = 0, []

        @hookimpl
        def fewstep_before_optimizer_step(self, trainer, phase, optimizer, grad_norm):
            Probe.steps += 1
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            clipped = float(torch.stack([g.double().norm() for g in grads]).norm())
            Probe.norms.append(clipped)
            # grad_norm is the norm before the clip (train.grad_clip=10): the clipped grads have min(it, 10)
            assert clipped == pytest.approx(min(float(grad_norm), 10.0), rel=1e-5)

    cfg = resolve(parse_overrides(["objective=sfd", "teacher=checkpoint", f"teacher.path={teacher}", "objective.nfe=3",
                                   "train.steps=2", "train.batch=16", "train.eval_every=0", "train.preview_every=0",
                                   "train.eval_samples=16", "train.progress=false", f"out={tmp_path / 'sfd'}"]))
    Trainer(cfg, log=lambda m: None, plugins=[Probe()]).train()
    assert Probe.steps == 2 * 3 and all(n > 0 for n in Probe.norms)  # 3 trained student steps per iteration


FAST = ["student.hidden=16", "student.depth=1", "train.batch=16", "train.steps=2", "train.eval_every=0",
        "train.preview_every=0", "train.eval_samples=16", "train.progress=false", "objective.critic_updates=2"]


@pytest.fixture
def recorder_registry():
    """The process-wide registry (what ``python -m core.run`` uses) with the recorder callback added."""
    registry = Registry()
    registry.add(RecorderPlugin, name="recorder-plugin")
    RecorderPlugin.built.clear()
    set_registry(registry)
    yield registry
    set_registry(None)


def test_callback_settings_on_the_command_line_reach_the_callback_and_its_config_yaml(tmp_path, recorder_registry):
    out = tmp_path / "run"
    assert run_main([*FAST, "callbacks.recorder.tag=from-cli", "callbacks=[recorder]", f"out={out}"]) == 0
    (recorder,) = RecorderPlugin.built
    assert recorder.config == RecorderConfig(tag="from-cli")
    saved = yaml.safe_load((out / "config.yaml").read_text())["callbacks"]
    assert saved == {"name": ["recorder"], "recorder": {"tag": "from-cli"}}
    # config=RUN/config.yaml reproduces it, and an override on top of it changes the one field
    again = resolve(load_tree([f"config={out / 'config.yaml'}"]), recorder_registry)
    assert again.callbacks == ["recorder"] and again.callback_configs == {"recorder": RecorderConfig(tag="from-cli")}
    over = resolve(load_tree([f"config={out / 'config.yaml'}", "callbacks.recorder.tag=x"]), recorder_registry)
    assert over.callback_configs == {"recorder": RecorderConfig(tag="x")}
    # a run without callback settings keeps config.yaml's plain list
    plain = resolve(parse_overrides(["callbacks=[recorder]"]), recorder_registry)
    assert plain.to_dict()["callbacks"] == {"name": ["recorder"], "recorder": {"tag": "recorded"}}
    assert resolve(parse_overrides([]), recorder_registry).to_dict()["callbacks"] == []


@pytest.mark.parametrize("argv, message", [
    (["callbacks=[recorder]", "callbacks.recorder.tga=x"],
     "unknown key 'callbacks.recorder.tga' (did you mean 'tag'?); callbacks.recorder accepts: tag"),
    (["callbacks.recorder.tag=x"], "callbacks.recorder is set but 'recorder' is not in callbacks=[]; "
                                   "add it: callbacks=[recorder]"),
    (["callbacks=[recorder]", "callbacks.recorder=x"], "callbacks.recorder takes callbacks.recorder.FIELD=VALUE"),
])
def test_bad_callback_settings_are_one_line_errors_and_write_nothing(tmp_path, capsys, recorder_registry,
                                                                       argv, message):
    out = tmp_path / "run"
    assert run_main([*FAST, *argv, f"out={out}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: ") and message in lines[0], err
    assert not out.exists() and RecorderPlugin.built == []
