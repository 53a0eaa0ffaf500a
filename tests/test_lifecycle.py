"""The run's lifecycle hooks (core.hookspecs ``fewstep_*``): a third-party callback plugin, registered like any
plugin, gets its config and sees every event in order, with the losses and optimizer steps the objective's
phases declare; a test probe passed to the Trainer sees the same on every rank."""

import attrs
import torch

from core import hookimpl
from core.config import parse_overrides
from core.registry import Registry
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
        def fewstep_before_optimizer_step(self, trainer, phase, optimizer):
            Probe.steps += 1
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            Probe.norms.append(float(torch.stack([g.norm() for g in grads]).norm()))

    cfg = resolve(parse_overrides(["objective=sfd", "teacher=checkpoint", f"teacher.path={teacher}", "objective.nfe=3",
                                   "train.steps=2", "train.batch=16", "train.eval_every=0", "train.preview_every=0",
                                   "train.eval_samples=16", "train.progress=false", f"out={tmp_path / 'sfd'}"]))
    Trainer(cfg, log=lambda m: None, plugins=[Probe()]).train()
    assert Probe.steps == 2 * 3 and all(n > 0 for n in Probe.norms)  # 3 trained student steps per iteration
