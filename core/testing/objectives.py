"""Objectives: protocol, phase declarations, gradients land only where declared, exact resume."""

from __future__ import annotations

import json
import os

import attrs
import torch

from core.config import TrainConfig
from core import hookimpl
from core.protocols import Context, Phase, SamplingSpec, phase_losses

from ._report import Report, _accepts, fail
from ._setup import Setup
from .denoisers import _params, _teacher_modules


_METHODS = {"build": ("nets",), "phases": (), "loss": ("phase", "ctx"), "sampling": ("student",)}


def _check_objective_protocol(setup: Setup, obj) -> None:
    factory = setup.info.factory
    needs = getattr(factory, "needs_critic", None)
    if not isinstance(needs, bool):
        fail(f"the objective factory has needs_critic={needs!r}", "set the class attribute needs_critic = True/False "
             "(runconfig reads it from the class, before building)")
    if getattr(obj, "needs_critic", None) != needs:
        fail("needs_critic differs between the class and the instance", "set it once, as a class attribute")
    for meth, args in _METHODS.items():
        fn = getattr(obj, meth, None)
        if not callable(fn):
            fail(f"objective has no {meth}()", f"define {meth}({', '.join(args)}) (core.protocols.DistillObjective)")
        sig = _accepts(fn, *[None] * len(args))
        if sig:
            fail(f"objective.{sig} cannot be called as {meth}({', '.join(args)})",
                 f"define {meth}(self{''.join(', ' + a for a in args)})")
    if needs and setup.info.default_critic is not None:
        setup.registry.get("critic", setup.info.default_critic)
    extra = set(setup.info.train_defaults) - {f.name for f in attrs.fields(TrainConfig)}
    if extra:
        fail(f"train_defaults has unknown keys {sorted(extra)}", "use TrainConfig fields (python -m core.run help train=1)")


def _check_phases(obj, nets: dict) -> list[Phase]:
    phases = obj.phases()
    if not isinstance(phases, (list, tuple)) or not phases:
        fail(f"phases() returned {phases!r}", "return a non-empty list of core.protocols.Phase")
    names = []
    for p in phases:
        if not isinstance(p, Phase):
            fail(f"phases() holds a {type(p).__name__}", "return core.protocols.Phase objects")
        names.append(p.name)
        if isinstance(p.trains, str) or not p.trains or not all(isinstance(n, str) for n in p.trains):
            fail(f"phase '{p.name}' has trains={p.trains!r}", f"give a tuple of network names, e.g. trains=('student',)")
        unknown = [n for n in p.trains if n not in nets or n == "teacher"]
        if unknown:
            fail(f"phase '{p.name}' trains {unknown}, which the run does not have as trainable networks "
                 f"(it has {sorted(k for k in nets if k != 'teacher')})",
                 "name 'student', 'critic' (with needs_critic = True) or a module returned by build()")
        if not (p.every >= 1 and 0 <= p.offset < p.every and p.repeats >= 1 and p.lr > 0):
            fail(f"phase '{p.name}' has every={p.every}, offset={p.offset}, repeats={p.repeats}, lr={p.lr}",
                 "use every >= 1, 0 <= offset < every, repeats >= 1, lr > 0")
        if p.grad_clip is not None and p.grad_clip <= 0:
            fail(f"phase '{p.name}' has grad_clip={p.grad_clip}", "use None or a positive norm")
    if len(set(names)) != len(names):
        fail(f"phase names repeat: {names}", "give each phase its own name (optimizers are keyed by it)")
    declared = {n for p in phases for n in p.trains}
    for name, module in nets.items():
        if name != "teacher" and isinstance(module, torch.nn.Module) and name not in declared \
                and any(q.requires_grad for q in module.parameters()):
            fail(f"network '{name}' has trainable parameters but no phase trains it",
                 f"add it to a phase's trains, or freeze it (requires_grad_(False)) in build()")
    return list(phases)


def _check_spec(setup: Setup, obj, student) -> None:
    spec = obj.sampling(student)
    if not isinstance(spec, SamplingSpec):
        fail(f"sampling() returned {type(spec).__name__}", "return core.protocols.SamplingSpec(sampler, times, options)")
    setup.registry.get("sampler", spec.sampler)
    times = torch.as_tensor(spec.times, dtype=torch.float64)
    if times.ndim != 1 or len(times) < 2 or not bool((times[:-1] > times[1:]).all()) or times[-1] < 0 \
            or times[0] > student.schedule.t_max * (1 + 1e-6):
        fail(f"sampling() times {spec.times} are not a decreasing grid in [0, t_max]",
             "build times with core.timesteps.make_grid(student.schedule, steps) (0.0 last returns x0)")
    try:
        json.dumps(attrs.asdict(spec))
    except TypeError:
        fail(f"SamplingSpec options {spec.options!r} are not JSON", "use plain numbers, strings and lists (meta.json holds them)")
    if callable(getattr(obj, "with_steps", None)):
        other = obj.with_steps(spec, 2, student)
        if not isinstance(other, SamplingSpec):
            fail(f"with_steps() returned {type(other).__name__}", "return a SamplingSpec")
    from core.generation import generate

    x = generate(student, spec, 8, None if not getattr(setup.teacher, "num_classes", 0) else
                 setup.teacher.encode_condition(torch.arange(8) % setup.teacher.num_classes),
                 setup.registry, setup.device, shape=setup.teacher.data_shape)
    if tuple(x.shape) != (8, *setup.teacher.data_shape) or not torch.isfinite(x).all():
        fail(f"sampling the student with its SamplingSpec gave {tuple(x.shape)} (finite: {bool(torch.isfinite(x).all())})",
             "return a spec whose sampler produces data_shape samples")


def _check_loss_output(phase: str, out) -> None:
    if not (isinstance(out, tuple) and len(out) == 2):
        fail(f"loss('{phase}', ctx) returned {type(out).__name__}", "return (loss tensor, metrics dict)")
    loss, metrics = out
    if not torch.is_tensor(loss) or loss.numel() != 1:
        fail(f"loss('{phase}', ctx)[0] is {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}",
             "return a scalar (0-d) tensor")
    if not torch.isfinite(loss).all():
        fail(f"loss('{phase}', ctx) is {float(loss)}", "keep the loss finite on a 16-row batch at initialisation")
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        fail(f"loss('{phase}', ctx)[1] is {type(metrics).__name__}", "return a dict of name -> float or 0-d tensor")
    for k, v in metrics.items():
        if not (isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)):
            fail(f"metric '{k}' of phase '{phase}' is {type(v).__name__}", "log floats or 0-d tensors")


def _reach(setup: Setup, phase: str) -> list[str]:
    """Which networks the phase's loss reaches with every network trainable (for messages)."""
    from core.roles import Networks

    try:
        torch.manual_seed(0)
        networks = Networks(setup.cfg, setup.registry, setup.device)
        modules = {**networks.trainable, **_teacher_modules(networks.teacher)}
        for m in modules.values():
            m.requires_grad_(True)
        x, cond, _ = setup.batch(16)
        ctx = Context(networks.nets, {"x": x, "cond": cond}, 0, 16, setup.device)
        for p in networks.objective.phases():
            ctx.iteration = p.offset
            loss, _ = next(phase_losses(networks.objective, p.name, ctx))
            if p.name == phase:
                if loss.requires_grad:
                    loss.backward()
                return sorted(n for n, m in modules.items() if any(q.grad is not None for q in m.parameters()))
    except Exception:
        pass
    return []


class _Probe:
    """Watches each phase of a real run through the lifecycle hooks: its losses, and which networks hold
    gradients when its optimizer steps."""

    def __init__(self):
        self.probe: dict = {}
        self.modules: dict = {}

    @hookimpl
    def fewstep_run_start(self, trainer, start):
        self.probe = {p.name: {"calls": 0, "steps": 0, "reached": set()} for p in trainer.phases}
        self.modules = {**trainer.networks.trainable, **_teacher_modules(trainer.teacher)}

    @hookimpl
    def fewstep_phase_loss(self, trainer, phase, loss, metrics):
        _check_loss_output(phase.name, (loss, metrics))
        self.probe[phase.name]["calls"] += 1

    @hookimpl
    def fewstep_before_optimizer_step(self, trainer, phase, optimizer):
        rec = self.probe[phase.name]
        rec["steps"] += 1
        rec["reached"] |= {n for n, m in self.modules.items() if any(q.grad is not None for q in _params(m))}


def _state(trainer) -> dict:
    out = {}
    for name, module in trainer.networks.trainable.items():
        out.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    if getattr(trainer, "ema", None) is not None:
        out.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    return out


def _check_runs(setup: Setup, phases: list[Phase]) -> None:
    """A fresh run of T iterations under the probe, then the same run interrupted at T/2 and resumed:
    the two must end with identical weights."""
    from core.rundir import load_run
    from core.runner import Trainer

    total = 2 * max(2, *[p.every for p in phases])
    cfg = setup.cfg
    fresh_cfg = attrs.evolve(cfg, train=attrs.evolve(cfg.train, steps=total), out=os.path.join(setup.env.tmp, "fresh"))
    probe = _Probe()
    fresh = Trainer(fresh_cfg, setup.registry, log=lambda m: None, plugins=[probe])
    fresh.train()
    by_name = {p.name: p for p in phases}
    for name, rec in probe.probe.items():
        trains = set(by_name[name].trains)
        if rec["calls"] == 0:
            fail(f"phase '{name}' never ran in {total} iterations", "check every/offset")
        if rec["steps"] == 0:
            reach = _reach(setup, name)
            fail(f"phase '{name}' (trains={tuple(trains)}) returned a loss with no gradient on every call, so its "
                 f"optimizer never stepped" + (f"; with every network trainable the loss reaches {reach}" if reach else ""),
                 "make the loss depend on the networks in trains" + (f", or declare trains={tuple(reach)}" if reach else ""))
        leaks = rec["reached"] - trains
        if leaks:
            fail(f"phase '{name}' sent gradients to {sorted(leaks)}, which its trains={tuple(trains)} does not declare",
                 "don't set requires_grad yourself (the runner enables exactly the networks in trains); "
                 "detach or no_grad frozen paths")
        missing = trains - rec["reached"]
        if missing:
            reach = _reach(setup, name)
            fail(f"phase '{name}' declares trains={tuple(sorted(trains))} but its loss sends no gradient to "
                 f"{sorted(missing)}" + (f" (it reaches {reach})" if reach else ""),
                 "declare only the networks the loss trains, e.g. trains=" + repr(tuple(reach) or ("student",)))
    out = os.path.join(setup.env.tmp, "resumed")
    half = attrs.evolve(fresh_cfg, train=attrs.evolve(fresh_cfg.train, steps=total // 2), out=out)
    Trainer(half, setup.registry, log=lambda m: None).train()
    resumed = Trainer(attrs.evolve(fresh_cfg, out=out), setup.registry, log=lambda m: None)
    result = resumed.train()
    if result["start"] != total // 2:
        fail(f"a second run on the same out= started at {result['start']}, not at the checkpoint {total // 2}",
             "keep all state the runner must restore in the networks")
    a, b = _state(fresh), _state(resumed)
    for key in a:
        if key not in b or not torch.equal(a[key], b[key]):
            diff = float((a[key].double() - b[key].double()).abs().max()) if key in b else float("inf")
            fail(f"interrupted at {total // 2} and resumed, the run ends with different {key} than an uninterrupted "
                 f"one (max {diff:.3g})", "keep training state in modules from build() (they are checkpointed) and "
                 "draw randomness from torch's global RNG, not your own generator")
    networks, _, _ = load_run(out, setup.registry, setup.device)
    model = resumed.sampling_model()
    for k, v in model.state_dict().items():
        if not torch.equal(networks.student.state_dict()[k].cpu(), v.cpu()):
            fail(f"load_run's student differs from the trained one at {k}", "export the student's own state_dict")


def check_objective(setup: Setup, rep: Report) -> None:
    from core.roles import Networks

    obj = setup.info.factory(setup.config_of("objective"))
    if rep.run("protocol", _check_objective_protocol, setup, obj) is Report.FAILED:
        return
    torch.manual_seed(0)
    networks = setup.build("build its networks", lambda: Networks(setup.cfg, setup.registry, setup.device))
    phases = rep.run("phases", _check_phases, networks.objective, networks.nets)
    rep.run("sampling spec", _check_spec, setup, networks.objective, networks.student)
    if phases is Report.FAILED or rep.problems:
        return
    rep.run("training run and resume", _check_runs, setup, phases)
