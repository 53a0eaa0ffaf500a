"""Conformance suite for fewstep plugins: does a registered teacher, student, critic, objective, sampler,
dataset or callback keep the contracts of ``core/protocols.py``? (docs/plugins.md, "Testing your plugin")

Plain functions::

    from core.testing import check, check_plugin
    check("objective", "my-method")         # one plugin, by kind and name
    check_plugin("my_package")              # everything one entry point registered

raise ``ConformanceError`` listing every problem found, each with what to fix. As a pytest plugin
(``pytest_plugins = ["core.testing"]`` in a conftest.py) it adds the fixtures ``fewstep_registry`` and
``fewstep_conformance``.

Each check builds a small run around the plugin (a ``gmm`` ring8 teacher, ``objective=denoise`` unless the
plugin is the objective, 16-row batches, CPU). A plugin that needs other settings declares them on its
factory, ``conformance_config = {"teacher": "gmm", "teacher.preset": "cls4", "steps": 3}`` (CLI keys; keys
without a group prefix are the plugin's own), or a function ``conformance_config(env) -> dict``; one that
cannot run here sets ``conformance_skip = "why"``. A plugin whose defaults cannot be built in the default
setting and that declares nothing is reported with ``NeedsConfig`` (a skip, not a pass).
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import math
import os
import shutil
import tempfile
import traceback
from typing import Any, Callable

import attrs
import torch
import yaml

from core.config import GROUP_KIND, PLUGIN_GROUPS, TrainConfig, merge, parse_overrides, structure, unstructure
from core.errors import UsageError
from core.parameterization import bcast
from core.protocols import Context, Phase, SamplingSpec
from core.registry import KINDS, Registry, get_registry
from core.schedules import NoiseSchedule, make_schedule

KIND_GROUP = {kind: group for group, kind in GROUP_KIND.items()}
TOP_KEYS = (*PLUGIN_GROUPS, "train", "seed", "out", "callbacks")
SAMPLER_SIGNATURE = "fn(model, noise, times, cond=None, *, return_trajectory=False, guidance=None, callback=None, **options)"
# Small, fast, exactly resumable runner settings; objectives' train_defaults are overridden by these.
TRAIN = {"batch": 16, "eval_every": 0, "eval_samples": 64, "preview_every": 0, "progress": False, "device": "cpu",
         "log_every": 1, "ckpt_every": 1, "keep": 2, "lr_decay": "none", "warmup": 0}


class ConformanceError(AssertionError):
    """A plugin breaks a contract. The message lists each problem and what to change."""


class ConformanceSkip(Exception):
    """The plugin asked not to be checked here (``conformance_skip``)."""


class NeedsConfig(ConformanceSkip):
    """The plugin cannot be built in the default setting and declares no ``conformance_config``."""


def fail(problem: str, fix: str):
    raise ConformanceError(f"{problem}; fix: {fix}")


# ------------------------------------------------------------------------------------------------
# Where the checks run: Env, and the small run configuration built around a plugin.

@attrs.define
class Env:
    """What a ``conformance_config(env)`` function gets: a scratch dir, the registry, and ``teacher_run()``,
    the out= dir of a trained ``objective=denoise`` ring8 run (for ``teacher=checkpoint``-style plugins)."""

    tmp: str
    registry: Registry
    teacher_run_fn: Callable[[], str] | None = None

    def teacher_run(self) -> str:
        return self.teacher_run_fn() if self.teacher_run_fn is not None else _trained_teacher_run(self.registry)


_TEACHER_RUNS: dict[int, str] = {}


def _trained_teacher_run(registry: Registry) -> str:
    """A small denoise run on ring8 (trained once per process): a network teacher good enough that its
    x0 beats the trivial estimators."""
    if id(registry) not in _TEACHER_RUNS:
        from core.runner import Trainer

        tmp = tempfile.mkdtemp(prefix="fewstep-conformance-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        out = os.path.join(tmp, "teacher")
        tree = parse_overrides(["objective=denoise", "teacher=gmm", "teacher.preset=ring8", "student=mlp",
                                "student.hidden=64", "student.depth=2", "train.steps=300", "train.batch=256",
                                "train.eval_every=0", "train.preview_every=0", "train.progress=false",
                                "train.device=cpu", "train.eval_samples=64", "train.log_every=1000", f"out={out}"])
        from core.runconfig import resolve

        Trainer(resolve(tree, registry), registry).train()
        _TEACHER_RUNS[id(registry)] = out
    return _TEACHER_RUNS[id(registry)]


def _with_teacher_run(*extra: str):
    return lambda env: [f"teacher=checkpoint", f"teacher.path={env.teacher_run()}", *extra]


# Settings for built-ins whose files carry no conformance_config (the factory attribute wins).
BUILTIN_CONFIGS: dict[tuple[str, str], Any] = {
    ("teacher", "checkpoint"): _with_teacher_run(),
    ("student", "copy"): _with_teacher_run(),
    ("student", "copy-nfe"): _with_teacher_run(),
    ("dataset", "teacher-samples"): _with_teacher_run(),
    ("objective", "mm-param"): _with_teacher_run(),  # differentiates a network teacher's parameters
    ("objective", "sfd-v"): _with_teacher_run("student=copy-nfe"),  # a step-conditioned student
}


def _cli(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return yaml.safe_dump(list(value), default_flow_style=True).strip()
    return str(value)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, dict) else [(key, v)]
    return out


def declared_config(kind: str, name: str, registry: Registry, env: Env) -> dict | None:
    """The plugin's own conformance settings as an override tree (None when it declares none)."""
    factory = registry.get(kind, name).factory
    skip = getattr(factory, "conformance_skip", None)
    if skip:
        raise ConformanceSkip(f"{kind} '{name}': {skip}")
    spec = getattr(factory, "conformance_config", None)
    if spec is None:
        spec = BUILTIN_CONFIGS.get((kind, name))
    if callable(spec):
        spec = spec(env)
    if spec is None:
        return None
    items = _flatten(spec) if isinstance(spec, dict) else [tuple(s.split("=", 1)) for s in spec]
    group = KIND_GROUP.get(kind, kind)
    args = []
    for key, value in items:
        key = key if key.split(".")[0] in TOP_KEYS else f"{group}.{key}"
        args.append(f"{key}={_cli(value)}")
    return parse_overrides(args)


class Setup:
    """The small run around one plugin: its RunConfig, and the teacher and dataset built lazily."""

    def __init__(self, kind: str, name: str, registry: Registry, env: Env, device="cpu"):
        self.kind, self.name, self.registry, self.env = kind, name, registry, env
        self.device = torch.device(device)
        self.info = registry.get(kind, name)
        self.declared = declared_config(kind, name, registry, env)
        tree: dict = {"train": {k: _cli(v) for k, v in TRAIN.items()}, "out": os.path.join(env.tmp, "run")}
        if kind != "objective":
            tree["objective"] = "denoise"
        group = KIND_GROUP.get(kind)
        if group in PLUGIN_GROUPS:
            tree[group] = {"name": name}
        if self.declared:
            tree = merge(tree, self.declared)
        self.critic_fields = None
        if kind == "critic":
            obj = tree["objective"] if isinstance(tree["objective"], str) else tree["objective"]["name"]
            if not getattr(registry.get("objective", obj).factory, "needs_critic", False):
                self.critic_fields = {k: v for k, v in tree.pop("critic").items() if k != "name"}
        self.tree = tree
        self._teacher = self._dataset = None
        from core.runconfig import resolve

        self.cfg = self.build("resolve the configuration", lambda: resolve(tree, registry))

    def build(self, what: str, fn: Callable):
        """Run a construction step; without declared settings, a UsageError or missing optional dependency
        means "needs a conformance_config", not a broken plugin."""
        try:
            return fn()
        except (UsageError, ImportError) as exc:
            if self.declared is None:
                raise NeedsConfig(
                    f"{self.kind} '{self.name}' cannot {what} in the default conformance setting "
                    f"(teacher=gmm ring8): {type(exc).__name__}: {exc}. Give its factory a conformance_config "
                    "(see docs/plugins.md) or conformance_skip") from None
            raise

    @property
    def teacher(self):
        if self._teacher is None:
            cfg = self.cfg
            factory = self.registry.get("teacher", cfg.teacher.name).factory
            t = self.build("build its teacher", lambda: factory(cfg.teacher.config, self.device))
            if isinstance(t, torch.nn.Module):
                t.requires_grad_(False).eval()  # as the runner does
            self._teacher = t
        return self._teacher

    @property
    def dataset(self):
        if self._dataset is None and self.cfg.data is not None:
            info = self.registry.get("dataset", self.cfg.data.name)
            self._dataset = self.build("build its dataset", lambda: info.factory(self.cfg.data.config, self.teacher))
        return self._dataset

    def config_of(self, kind: str):
        if kind == "critic" and self.critic_fields is not None:
            info = self.registry.get("critic", self.name)
            return None if info.config is None else structure(self.critic_fields, info.config, "critic")
        if kind == "callback":
            return None
        choice = getattr(self.cfg, KIND_GROUP[kind])
        return None if choice is None else choice.config

    def batch(self, n: int):
        """(x0 in model space or None, cond for denoise, exact): real rows from the dataset or exact samples."""
        t = self.teacher
        if self.dataset is not None:
            raw = self.dataset.sample(n)
            cond = None if raw.get("cond") is None else t.encode_condition(raw["cond"])
            x = None if raw.get("x") is None else t.to_model_space(raw["x"].to(self.device))
            return x, cond, x is not None
        if hasattr(t, "sample_exact"):
            return t.sample_exact(n).to(self.device), None, True
        return None, None, False


# ------------------------------------------------------------------------------------------------
# Collecting problems: each check section is independent; a plugin author sees them all at once.

class Report:
    FAILED = object()

    def __init__(self, kind: str, name: str):
        self.label = f"{kind} '{name}'"
        self.problems: list[str] = []

    def run(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConformanceSkip:
            raise
        except ConformanceError as exc:
            self.problems.append(f"[{what}] {exc}")
        except Exception as exc:  # the plugin raised: say where
            self.problems.append(f"[{what}] raised {type(exc).__name__}: {exc} ({_where(exc)})")
        return Report.FAILED

    def done(self) -> None:
        if self.problems:
            raise ConformanceError(f"{self.label} fails the fewstep conformance suite:\n  - "
                                   + "\n  - ".join(self.problems))


def _where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.endswith("core/testing.py")]
    if not frames:
        return "in core/testing.py"
    f = frames[-1]
    return f"at {os.path.relpath(f.filename) if not f.filename.startswith('<') else f.filename}:{f.lineno} in {f.name}"


def _accepts(fn: Callable, *args, **kwargs) -> str | None:
    """None if ``fn`` can be called with these arguments, else its signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(*args, **kwargs)
        return None
    except TypeError:
        return f"{getattr(fn, '__name__', 'it')}{sig}"


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> tuple[bool, float]:
    a, b = a.detach().double(), b.detach().double()
    if not a.numel():
        return True, 0.0
    diff = float((a - b).abs().max())
    return diff <= rel * (1.0 + float(b.abs().max())), diff


# ------------------------------------------------------------------------------------------------
# Configs: cattrs round trip (config.yaml reproduces a run) and every field settable from the CLI.

def check_config(kind: str, name: str, cls: type, instance) -> None:
    group = KIND_GROUP.get(kind, kind)
    data = unstructure(instance)
    try:
        again = structure(data, cls, group)
    except UsageError as exc:
        fail(f"config {cls.__name__} does not survive unstructure -> structure ({exc})",
             "use field types cattrs can rebuild from plain data (str, int, float, bool, Literal, lists, tuples, Optional)")
    if unstructure(again) != data:
        fail(f"config {cls.__name__} changes on a round trip: {data} -> {unstructure(again)}",
             "make unstructure(structure(d)) == d (no converters that change stored values)")
    try:
        from_yaml = yaml.safe_load(yaml.safe_dump(data))
    except yaml.YAMLError as exc:
        fail(f"config {cls.__name__} cannot be written to config.yaml ({str(exc).splitlines()[0]})",
             "give fields plain YAML types (str, int, float, bool, None, lists)")
    if unstructure(structure(from_yaml, cls, group)) != data:
        fail(f"config {cls.__name__} changes through config.yaml", "use plain YAML types for every field")
    for field in attrs.fields(cls):
        value = data.get(field.name)
        if isinstance(value, dict):
            continue  # nested groups are set field by field
        text = _cli(value)
        try:
            got = unstructure(structure({**data, field.name: text}, cls, group)).get(field.name)
        except UsageError as exc:
            fail(f"{group}.{field.name}={text} (its own value, as the command line passes it) is rejected: {exc}",
                 f"give '{field.name}' a type the strict converter in core/config.py parses from strings")
        if got != value:
            fail(f"{group}.{field.name}={text} on the command line gives {got!r}, not {value!r}",
                 f"give '{field.name}' a type that parses back from its string form")


# ------------------------------------------------------------------------------------------------
# Denoisers (teacher, student, critic): shapes, dtypes, per-row times.

def _times(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """n times spread over the schedule's range (u = 0.05..0.95 of t_from_fraction), float64."""
    u = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    return torch.as_tensor(schedule.t_from_fraction(u), dtype=torch.float64)


def _noised(schedule, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    eps = torch.randn_like(x0)
    return (bcast(schedule.alpha(t), x0) * x0 + bcast(schedule.sigma(t), x0) * eps).to(x0.dtype)


def _rows(cond, idx):
    return None if cond is None else cond[idx]


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training if isinstance(model, torch.nn.Module) else None
    if was is not None:
        model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


def check_denoiser(role: str, model, data_shape: tuple, x0: torch.Tensor, cond) -> torch.Tensor:
    """denoise(x_t, t, cond) for a [B] tensor of per-row times: shape, dtype, finite, rows independent."""
    if not isinstance(getattr(model, "schedule", None), NoiseSchedule):
        fail(f"{role}.schedule is {type(getattr(model, 'schedule', None)).__name__}, not a NoiseSchedule",
             "set .schedule to a core.schedules.NoiseSchedule (make_schedule('edm'), VPDiscreteSchedule(...))")
    if not callable(getattr(model, "denoise", None)):
        fail(f"{role} has no denoise method", "define denoise(x_t, t, cond=None) -> x0")
    sched = model.schedule
    n = x0.shape[0]
    t = _times(sched, n)
    x_t = _noised(sched, x0, t)
    tt = t.to(torch.float32)
    with torch.no_grad(), _eval_mode(model):
        out = model.denoise(x_t, tt, cond)
        if not torch.is_tensor(out) or tuple(out.shape) != tuple(x_t.shape):
            fail(f"{role}.denoise returned {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__} "
                 f"for x_t of shape {tuple(x_t.shape)}", "return an x0 estimate with x_t's shape")
        if out.dtype != x_t.dtype:
            fail(f"{role}.denoise returned {out.dtype} for {x_t.dtype} input",
                 "cast the result back to x_t.dtype (compute in float32 or wider inside if you need to)")
        if not torch.isfinite(out).all():
            fail(f"{role}.denoise returned non-finite values over t in [{float(t.min()):.4g}, {float(t.max()):.4g}]",
                 "make denoise finite over the schedule's whole [t_min, t_max]")
        flip = torch.arange(n - 1, -1, -1)
        back = model.denoise(x_t[flip], tt[flip], _rows(cond, flip))
        ok, diff = _close(back, out[flip], 1e-4)
        if not ok:
            fail(f"{role}.denoise of the batch in reverse order differs from the reversed output (max {diff:.3g})",
                 "treat t as one time per row (shape [B]) and make rows independent (no batch statistics, "
                 "no t[0] for the whole batch)")
    if tuple(x0.shape[1:]) != tuple(data_shape):
        fail(f"data rows have shape {tuple(x0.shape[1:])}, data_shape says {tuple(data_shape)}",
             "set data_shape to the shape of one sample in model space")
    return out


def _params(module) -> list:
    return list(module.parameters()) if isinstance(module, torch.nn.Module) else []


def _storages(module) -> set:
    return {p.untyped_storage().data_ptr() for p in _params(module)}


def _teacher_modules(teacher) -> dict:
    if isinstance(teacher, torch.nn.Module):
        return {"teacher": teacher}
    return {f"teacher.{k}": v for k, v in vars(teacher).items() if isinstance(v, torch.nn.Module)}


# ------------------------------------------------------------------------------------------------
# Teacher: the Teacher protocol, and x0 consistent with its schedule.

def _check_teacher_protocol(t) -> None:
    missing = [m for m in ("denoise", "encode_condition", "to_model_space", "to_data_space", "trainable_copy")
               if not callable(getattr(t, m, None))]
    if missing:
        fail(f"teacher lacks {', '.join(missing)}", "implement the Teacher protocol of core/protocols.py")
    shape = getattr(t, "data_shape", None)
    if not (isinstance(shape, tuple) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        fail(f"teacher.data_shape is {shape!r}", "set data_shape to a tuple of positive ints, e.g. (4, 64, 64)")
    nc = getattr(t, "num_classes", 0)
    if not isinstance(nc, int) or nc < 0:
        fail(f"teacher.num_classes is {nc!r}", "set num_classes to an int (0 when unconditional)")
    sig = _accepts(t.denoise, torch.zeros(1), torch.zeros(1), None, guidance=None)
    if sig:
        fail(f"teacher.denoise{sig[sig.index('('):]} does not take guidance=", "define denoise(x_t, t, cond=None, guidance=None)")
    if callable(getattr(t, "sample_exact", None)) and _accepts(t.sample_exact, 4, None):
        fail("teacher.sample_exact cannot be called as sample_exact(n, labels)",
             "define sample_exact(n, labels=None) (the runner's evaluation passes class labels)")


def _check_teacher_small_t(t, x0, cond) -> None:
    """At the least noisy time, x0 is x_t / alpha up to O(sigma / alpha): the output is x0, in the
    schedule's time units."""
    sched = t.schedule
    tmin = torch.full((x0.shape[0],), float(sched.t_min), dtype=torch.float64)
    x_t = _noised(sched, x0, tmin)
    a, s = float(sched.alpha(tmin[:1])), float(sched.sigma(tmin[:1]))
    with torch.no_grad():
        d = t.denoise(x_t, tmin.float(), cond)
    err = float((d.double() - x_t.double() / a).square().mean().sqrt())
    scale = float(x0.double().square().mean().sqrt())
    if err > 4 * s / a + 0.02 * scale:
        fail(f"at t=t_min={sched.t_min:.4g} (sigma/alpha={s / a:.3g}) denoise is {err:.3g} (rms) away from x_t/alpha",
             "return x0 (not eps, v or the score) and read t in the schedule's own units")


def _check_teacher_mmse(t, x0, cond) -> None:
    """E[x0 | x_t] beats the trivial estimators x_t/alpha and E[x0], and averages to E[x0] (Tweedie)."""
    sched = t.schedule
    x0d = x0.double()
    std = float(x0d.std())
    for k in (0.5, 1.0):
        lam = torch.tensor(-2 * math.log(k * std), dtype=torch.float64)
        tk = float(torch.as_tensor(sched.t_from_logsnr(lam)).clamp(sched.t_min, sched.t_max))
        tv = torch.full((x0.shape[0],), tk, dtype=torch.float64)
        x_t = _noised(sched, x0, tv)
        with torch.no_grad():
            d = t.denoise(x_t, tv.float(), cond).double()
        a = float(sched.alpha(tv[:1]))
        mse = float((d - x0d).square().mean())
        trivial = min(float((x_t.double() / a - x0d).square().mean()), float((x0d.mean(0) - x0d).square().mean()))
        if mse > 0.95 * trivial:
            fail(f"at t={tk:.4g} (noise {k} x data std) denoise has mse {mse:.4g}, no better than x_t/alpha or "
                 f"the data mean ({trivial:.4g})", "return E[x0 | x_t] with t in the schedule's own units "
                 "(check the parameterisation conversion and the time passed to the network)")
        bias = (d - x0d).mean(0).abs().max()
        se = float((d - x0d).std(0).max()) / math.sqrt(x0.shape[0])
        if bias > 5 * se + 0.05 * std:
            fail(f"at t={tk:.4g} the mean of denoise over noised data is off the data mean by {float(bias):.3g}",
                 "E[denoise(x_t)] must equal E[x0] (Tweedie); look for a missing offset or scale")


def _check_teacher_guidance(t, x0, cond) -> None:
    sched = t.schedule
    tv = torch.full((x0.shape[0],), float(_times(sched, 3)[1]), dtype=torch.float64)
    x_t = _noised(sched, x0, tv)
    with torch.no_grad():
        plain = t.denoise(x_t, tv.float(), cond)
        one = t.denoise(x_t, tv.float(), cond, guidance=1.0)
        none = t.denoise(x_t, tv.float(), cond, guidance=None)
        three = t.denoise(x_t, tv.float(), cond, guidance=3.0)
    for what, out in (("guidance=1", one), ("guidance=None", none)):
        ok, diff = _close(out, plain)
        if not ok:
            fail(f"{what} changes the conditional denoise (max {diff:.3g})", "scale 1 (or None) means no guidance")
    if _close(three, plain, 1e-6)[0]:
        fail("guidance=3 gives the same x0 as no guidance", "apply classifier-free guidance with the given scale")


def _check_trainable_copy(t, x0, cond) -> None:
    net = t.trainable_copy()
    if net is None:
        return
    if not isinstance(net, torch.nn.Module) or not callable(getattr(net, "denoise", None)):
        fail(f"trainable_copy returned {type(net).__name__}", "return a torch.nn.Module with denoise() (or None)")
    if not any(p.requires_grad for p in net.parameters()):
        fail("trainable_copy has no parameter that requires grad", "return the copy with requires_grad_(True)")
    shared = _storages(net) & set().union(*[_storages(m) for m in _teacher_modules(t).values()])
    if shared:
        fail("trainable_copy shares parameter storage with the teacher", "deep-copy the network (copy.deepcopy)")
    sched = t.schedule
    tv = _times(sched, x0.shape[0])
    x_t = _noised(sched, x0, tv)
    with torch.no_grad(), _eval_mode(net):
        ok, diff = _close(net.denoise(x_t, tv.float(), cond), t.denoise(x_t, tv.float(), cond), 1e-3)
    if not ok:
        fail(f"trainable_copy's denoise differs from the teacher's (max {diff:.3g})",
             "initialise the copy from the teacher's weights, on the same schedule")


def check_teacher(setup: Setup, rep: Report) -> None:
    t = setup.teacher
    if rep.run("protocol", _check_teacher_protocol, t) is Report.FAILED:
        return
    x0, cond, exact = setup.batch(256)
    if x0 is None:
        x0 = torch.randn(256, *t.data_shape, device=setup.device) * float(getattr(t, "sigma_data", 0.5))
    if cond is None and getattr(t, "num_classes", 0):
        cond = t.encode_condition(torch.arange(256) % t.num_classes)

    def outputs():
        out = check_denoiser("teacher", t, t.data_shape, x0, cond)
        if out.requires_grad:
            fail("teacher.denoise output requires grad", "freeze the teacher (requires_grad_(False)) or run under no_grad")
        back = t.to_data_space(t.to_model_space(t.to_data_space(x0[:4])))
        if tuple(back.shape) != tuple(t.to_data_space(x0[:4]).shape):
            fail("to_data_space(to_model_space(x)) changes the shape", "make the two maps inverse in shape")

    rep.run("denoise shapes", outputs)
    rep.run("x0 at small t", _check_teacher_small_t, t, x0, cond)
    if exact:
        rep.run("x0 vs data (MMSE, Tweedie)", _check_teacher_mmse, t, x0, cond)
    if getattr(t, "num_classes", 0):
        rep.run("guidance", _check_teacher_guidance, t, x0, cond)
    rep.run("trainable_copy", _check_trainable_copy, t, x0[:32], _rows(cond, slice(0, 32)))


# ------------------------------------------------------------------------------------------------
# Student and critic: trainable modules with denoise, rebuilt from their state_dict by load_run.

def _check_trainable_net(role: str, build: Callable, setup: Setup, others: dict) -> None:
    torch.manual_seed(0)
    net = setup.build(f"build the {role}", build)
    if not isinstance(net, torch.nn.Module):
        fail(f"the {role} factory returned {type(net).__name__}", "return a torch.nn.Module with denoise() and schedule")
    if not any(p.requires_grad for p in net.parameters()):
        fail(f"{role} has no parameter that requires grad", "return the network with trainable parameters")
    for other, module in others.items():
        if _storages(net) & _storages(module):
            fail(f"{role} shares parameter storage with the {other}", "copy the weights (copy.deepcopy) instead of sharing")
    t = setup.teacher
    x0, cond, _ = setup.batch(32)
    if x0 is None:
        x0 = torch.randn(32, *t.data_shape) * float(getattr(t, "sigma_data", 0.5))
    out = check_denoiser(role, net, t.data_shape, x0, cond)
    # a loss on the output must reach the parameters
    sched = net.schedule
    tv = _times(sched, x0.shape[0])
    net.zero_grad(set_to_none=True)
    net.denoise(_noised(sched, x0, tv), tv.float(), cond).square().mean().backward()
    if not any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters()):
        fail(f"no gradient reaches the {role}'s parameters from denoise()", "don't detach or run denoise under no_grad")
    net.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    again = build()
    again.load_state_dict(net.state_dict())
    x_t = _noised(sched, x0, tv)
    with torch.no_grad(), _eval_mode(net), _eval_mode(again):
        ok, diff = _close(again.denoise(x_t, tv.float(), cond), net.denoise(x_t, tv.float(), cond), 1e-5)
    if not ok:
        fail(f"a {role} rebuilt by its factory and loaded from the state_dict gives different outputs (max {diff:.3g})",
             "keep every tensor denoise() uses in parameters or registered buffers; load_run and "
             "teacher=checkpoint rebuild networks this way")
    del out


def check_student(setup: Setup, rep: Report) -> None:
    info, t = setup.info, setup.teacher
    config = setup.config_of("student")
    rep.run("student", _check_trainable_net, "student", lambda: info.factory(config, t, setup.device), setup,
            _teacher_modules(t))


def check_critic(setup: Setup, rep: Report) -> None:
    t, cfg = setup.teacher, setup.cfg
    sinfo = setup.registry.get("student", cfg.student.name)
    torch.manual_seed(0)
    student = setup.build("build a student", lambda: sinfo.factory(cfg.student.config, t, setup.device))
    config = setup.config_of("critic")
    rep.run("critic", _check_trainable_net, "critic", lambda: setup.info.factory(config, t, student, setup.device),
            setup, {"student": student, **_teacher_modules(t)})


# ------------------------------------------------------------------------------------------------
# Dataset: {"x", "cond"} rows in data space, reproducible from torch's global RNG.

def check_dataset(setup: Setup, rep: Report) -> None:
    ds, t = setup.dataset, setup.teacher
    if ds is None:
        fail("the run built no dataset", "set data=NAME in conformance_config")

    def draw():
        if not callable(getattr(ds, "sample", None)):
            fail("dataset has no sample(n)", "define sample(n) -> {'x': Tensor | None, 'cond': raw | None}")
        torch.manual_seed(7)
        a = ds.sample(8)
        torch.manual_seed(7)
        b = ds.sample(8)
        if not isinstance(a, dict) or not {"x", "cond"} <= set(a):
            fail(f"sample(n) returned {type(a).__name__}{sorted(a) if isinstance(a, dict) else ''}",
                 "return a dict with keys 'x' and 'cond' (None when absent)")
        if a["x"] is None and a["cond"] is None:
            fail("sample(n) returned neither x nor cond", "return real data 'x' and/or conditions 'cond'")
        if a["x"] is not None:
            x = a["x"]
            if not torch.is_tensor(x) or x.shape[0] != 8 or not x.is_floating_point():
                fail(f"sample(8)['x'] is {type(x).__name__} {tuple(getattr(x, 'shape', ()))}",
                     "return a floating tensor with n rows, in data space")
            z = t.to_model_space(x.to(setup.device))
            if tuple(z.shape) != (8, *t.data_shape):
                fail(f"to_model_space(sample(8)['x']) has shape {tuple(z.shape)}, the teacher wants (8, *{t.data_shape})",
                     "return rows of the teacher's data (in data space)")
            if not torch.equal(a["x"], b["x"]):
                fail("sample(n) differs under the same torch.manual_seed", "draw randomness from torch's global RNG "
                     "(torch.randint, torch.randn...) so resumed runs see the same data")
        if a["cond"] is not None:
            if len(a["cond"]) != 8:
                fail(f"sample(8)['cond'] has {len(a['cond'])} rows", "return one condition per row")
            t.encode_condition(a["cond"])
            same = torch.equal(a["cond"], b["cond"]) if torch.is_tensor(a["cond"]) else a["cond"] == b["cond"]
            if not same:
                fail("sample(n)['cond'] differs under the same torch.manual_seed", "draw from torch's global RNG")

    rep.run("sample", draw)


# ------------------------------------------------------------------------------------------------
# Samplers: the k-diffusion-style signature, behaviour on exact Gaussian and point-mass denoisers.

class GaussianDenoiser:
    """Exact E[x0 | x_t] for x0 ~ N(mean, std^2 I) on any schedule:
    mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mean). Records its calls. Takes no
    ``guidance`` (like a student), so a sampler must not pass one unless asked."""

    def __init__(self, schedule: NoiseSchedule, mean: float = 0.3, std: float = 0.5, dim: int = 2):
        self.schedule, self.mean, self.std, self.data_shape = schedule, mean, std, (dim,)
        self.calls: list[dict] = []

    def denoise(self, x_t, t, cond=None):
        self.calls.append({"t": t, "cond": cond, "rows": x_t.shape[0]})
        if not (torch.is_tensor(t) and tuple(t.shape) == (x_t.shape[0],)):
            fail(f"the sampler called denoise with t = {t!r:.60}", "pass t as a [B] tensor (one time per row)")
        t64 = t.double()
        a, s = bcast(self.schedule.alpha(t64), x_t).double(), bcast(self.schedule.sigma(t64), x_t).double()
        v = self.std**2
        x0 = self.mean + a * v / (a * a * v + s * s) * (x_t.double() - a * self.mean)
        return x0.to(x_t.dtype)


class GuidedGaussianDenoiser(GaussianDenoiser):
    """The same, taking ``guidance`` like a teacher (and recording it)."""

    def denoise(self, x_t, t, cond=None, guidance=None):
        self.calls.append({"guidance": guidance})
        return super().denoise(x_t, t, cond)


class PointMassDenoiser:
    """Data = one point c: E[x0 | x_t] = c at every t. A grid ending in 0.0 must return exactly c."""

    def __init__(self, schedule, c):
        self.schedule, self.c = schedule, c

    def denoise(self, x_t, t, cond=None):
        return self.c.expand_as(x_t).to(x_t.dtype)


def _sampler_options(setup: Setup) -> dict:
    config = setup.config_of("sampler")
    return attrs.asdict(config) if config is not None else {}


def check_sampler(setup: Setup, rep: Report) -> None:
    fn, name, opts = setup.info.factory, setup.name, _sampler_options(setup)
    edm = make_schedule("edm")
    from core.timesteps import make_grid

    def signature():
        sig = _accepts(fn, None, None, None, None, return_trajectory=True, guidance=None, callback=None, **opts)
        if sig:
            fail(f"sampler '{name}' has signature {sig}",
                 f"use {SAMPLER_SIGNATURE}; every field of its config must be a keyword option")

    if rep.run("signature", signature) is Report.FAILED:
        return

    def shapes():
        model = GaussianDenoiser(edm)
        times = make_grid(edm, 6)
        noise = torch.randn(32, 2)
        seen = []
        out = fn(model, noise, times, None, return_trajectory=True, callback=seen.append, **opts)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple))):
            fail("return_trajectory=True did not return (x, [x_0, x_1, ...])", "return (x, trajectory list)")
        x, traj = out
        if tuple(x.shape) != tuple(noise.shape) or x.dtype != noise.dtype:
            fail(f"sampler returned {tuple(x.shape)} {x.dtype} for noise {tuple(noise.shape)} {noise.dtype}",
                 "return samples with the noise's shape and dtype")
        if not torch.isfinite(x).all():
            fail("sampler returned non-finite samples", "check the update at the first and last times")
        if len(traj) != len(times) or not torch.equal(traj[-1], x):
            fail(f"trajectory has {len(traj)} entries for {len(times)} times (or does not end with the output)",
                 "record the start and the state after each step; the last entry is the output")
        if len(seen) != len(times) - 1 or not all({"x", "i", "t", "denoised"} <= set(s) for s in seen):
            fail(f"callback saw {len(seen)} calls for {len(times) - 1} steps (each needs x, i, t, denoised)",
                 "call callback({'x', 'i', 't', 'denoised'}) once per step")
        if x.requires_grad:
            fail("sampler output requires grad", "decorate the sampler with @torch.no_grad()")
        # conditions and guidance reach the model; no guidance is passed when none is asked for
        cond = torch.arange(32) % 3
        guided = GuidedGaussianDenoiser(edm)
        fn(guided, noise, times, cond, guidance=2.5, **opts)
        if not guided.calls or any(c.get("guidance", 2.5) != 2.5 for c in guided.calls):
            fail("guidance=2.5 did not reach model.denoise", "pass guidance=... to model.denoise when it is not None")
        if any(c.get("cond") is not None and not torch.equal(c["cond"], cond) for c in guided.calls) or \
                all(c.get("cond") is None for c in guided.calls):
            fail("cond did not reach model.denoise unchanged", "pass cond through to model.denoise")
        if any(not torch.isfinite(c["t"]).all() or (c["t"] <= 0).any() for c in model.calls):
            fail("the sampler called denoise at t <= 0", "return the last x0 at the final time 0.0 instead of calling denoise there")

    def point_mass():
        c = torch.tensor([0.7, -1.3])
        for kind in ("edm", "vp-cosine"):
            sched = make_schedule(kind)
            out = fn(PointMassDenoiser(sched, c), torch.randn(16, 2), make_grid(sched, 4), None, **opts)
            if not torch.allclose(out, c.expand_as(out), atol=1e-5):
                fail(f"on a {kind} grid ending in 0.0 with data = one point, the output is not that point "
                     f"(max error {float((out - c).abs().max()):.3g})", "a final time of 0.0 returns the last denoised x0")

    def distribution():
        # a coarse consistency check that any sampler passes, ODE solvers and few-step generator samplers
        # alike (the latter expect a generator, not a posterior mean, so their spread differs)
        for kind in ("edm", "vp-cosine", "flow"):
            sched = make_schedule(kind)
            model = GaussianDenoiser(sched)
            torch.manual_seed(0)
            x = fn(model, torch.randn(4000, 2), make_grid(sched, 32), None, **opts).double()
            mean, std = float(x.mean()), float(x.std())
            if abs(mean - model.mean) > 0.05 or not 0.5 < std / model.std < 1.5:
                fail(f"with the exact denoiser of N({model.mean}, {model.std}^2) on {kind}, 32 steps give mean "
                     f"{mean:.3f} and std {std:.3f}", "start from x = sigma(times[0]) * noise and follow the "
                     "schedule's alpha and sigma at each step")

    def determinism():
        sched = make_schedule("vp-cosine")
        noise, times = torch.randn(64, 2), make_grid(sched, 5)
        runs = []
        for _ in range(2):
            torch.manual_seed(3)
            runs.append(fn(GaussianDenoiser(sched), noise, times, None, **opts))
        if not torch.equal(runs[0], runs[1]):
            fail("two runs under the same torch.manual_seed differ", "draw all noise from torch's RNG "
                 "(torch.randn / randn_like, or the generator= you are given)")
        if "generator" in inspect.signature(fn).parameters:
            outs = [fn(GaussianDenoiser(sched), noise, times, None, generator=torch.Generator().manual_seed(5), **opts)
                    for _ in range(2)]
            if not torch.equal(outs[0], outs[1]):
                fail("two runs with the same generator= differ", "draw every random number from generator")

    rep.run("shapes and arguments", shapes)
    rep.run("point-mass data", point_mass)
    rep.run("exact Gaussian data", distribution)
    rep.run("deterministic under a seed", determinism)


# ------------------------------------------------------------------------------------------------
# Objectives: protocol, phase declarations, gradients land only where declared, exact resume.

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
    if needs and getattr(factory, "default_critic", None) is not None:
        setup.registry.get("critic", factory.default_critic)
    extra = set(getattr(factory, "train_defaults", {}) or {}) - {f.name for f in attrs.fields(TrainConfig)}
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
    from core.sampling import generate

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
    from core.runner import Networks

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
            loss, _ = networks.objective.loss(p.name, ctx)
            if p.name == phase:
                if loss.requires_grad:
                    loss.backward()
                return sorted(n for n, m in modules.items() if any(q.grad is not None for q in m.parameters()))
    except Exception:
        pass
    return []


def _probe_trainer(Trainer):
    class ProbeTrainer(Trainer):
        """The real runner, watching each phase: its loss output, and which networks hold gradients
        when its optimizer steps."""

        def build(self):
            super().build()
            self.probe = {p.name: {"calls": 0, "steps": 0, "reached": set()} for p in self.phases}
            modules = {**self.networks.trainable, **_teacher_modules(self.teacher)}
            loss_fn = self.objective.loss

            def loss(phase, ctx):
                out = loss_fn(phase, ctx)
                _check_loss_output(phase, out)
                self.probe[phase]["calls"] += 1
                return out

            self.objective.loss = loss
            for name, opt in self.optimizers.items():
                def step(*args, _step=opt.step, _rec=self.probe[name], **kwargs):
                    _rec["steps"] += 1
                    _rec["reached"] |= {n for n, m in modules.items() if any(q.grad is not None for q in _params(m))}
                    return _step(*args, **kwargs)

                opt.step = step

    return ProbeTrainer


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
    from core.runner import Trainer, load_run

    total = 2 * max(2, *[p.every for p in phases])
    cfg = setup.cfg
    fresh_cfg = attrs.evolve(cfg, train=attrs.evolve(cfg.train, steps=total), out=os.path.join(setup.env.tmp, "fresh"))
    fresh = _probe_trainer(Trainer)(fresh_cfg, setup.registry, log=lambda m: None)
    fresh.train()
    by_name = {p.name: p for p in phases}
    for name, rec in fresh.probe.items():
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
    from core.runner import Networks

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


# ------------------------------------------------------------------------------------------------
# Callbacks: built as the runner builds them (factory(None)); hook methods take the runner's arguments.

_CALLBACK_HOOKS = {"on_start": 1, "on_log": 2, "on_checkpoint": 2, "on_end": 1}


def check_callback(setup: Setup, rep: Report) -> None:
    def hooks():
        cb = setup.info.factory(None)
        found = [h for h in _CALLBACK_HOOKS if callable(getattr(cb, h, None))]
        if not found:
            fail("callback has none of on_start, on_log, on_checkpoint, on_end", "define at least one")
        for h in found:
            sig = _accepts(getattr(cb, h), *[None] * _CALLBACK_HOOKS[h])
            if sig:
                args = "trainer" if _CALLBACK_HOOKS[h] == 1 else ("trainer, record" if h == "on_log" else "trainer, path")
                fail(f"callback.{sig} cannot be called as {h}({args})", f"define {h}(self, {args})")

    rep.run("hooks", hooks)


# ------------------------------------------------------------------------------------------------
# Entry points.

CHECKS = {"teacher": check_teacher, "student": check_student, "critic": check_critic, "dataset": check_dataset,
          "sampler": check_sampler, "objective": check_objective, "callback": check_callback}


def check(kind: str, name: str, registry: Registry | None = None, tmp_path=None, env: Env | None = None,
          device="cpu") -> None:
    """Run the conformance suite on one registered plugin; raise ConformanceError listing every problem
    (or ConformanceSkip / NeedsConfig when it cannot run here)."""
    if kind not in CHECKS:
        raise UsageError(f"unknown plugin kind '{kind}'; choose one of: {', '.join(KINDS)}")
    registry = registry or get_registry()
    with contextlib.ExitStack() as stack:
        if env is None:
            tmp = str(tmp_path) if tmp_path is not None else stack.enter_context(tempfile.TemporaryDirectory())
            env = Env(tmp, registry)
        env = attrs.evolve(env, tmp=os.path.join(env.tmp, f"{kind}-{name}"))
        os.makedirs(env.tmp, exist_ok=True)
        rep = Report(kind, name)
        state, threads = torch.get_rng_state(), torch.get_num_threads()
        torch.set_num_threads(1)  # tiny batches: one thread is fastest, and far faster on a busy machine
        try:
            setup = Setup(kind, name, registry, env, device)
            if setup.info.config is not None:
                config = setup.config_of(kind)
                if config is not None:
                    rep.run("config round trip", check_config, kind, name, setup.info.config, config)
            CHECKS[kind](setup, rep)
        except (ConformanceSkip, ConformanceError):
            raise
        except Exception as exc:
            rep.problems.append(f"[setup] raised {type(exc).__name__}: {exc} ({_where(exc)})")
        finally:
            torch.set_rng_state(state)
            torch.set_num_threads(threads)
        rep.done()


def cases(registry: Registry | None = None, dist: str | None = None, plugin: str | None = None,
          kinds=KINDS) -> list[tuple[str, str]]:
    """(kind, name) of every registered plugin, optionally only those of one distribution or entry point;
    for ``pytest.mark.parametrize`` at collection time."""
    registry = registry or get_registry()
    return [(kind, name) for kind in kinds for name, info in sorted(registry.plugins[kind].items())
            if (dist is None or info.dist == dist) and (plugin is None or info.plugin == plugin)]


def check_plugin(plugin: str, registry: Registry | None = None, tmp_path=None, env: Env | None = None) -> list:
    """Check everything one entry point (pluggy plugin name) registered; returns the (kind, name) checked
    (skipped ones left out; ConformanceSkip when all were skipped)."""
    registry = registry or get_registry()
    found = cases(registry, plugin=plugin)
    if not found:
        known = sorted({info.plugin for kind in KINDS for info in registry.plugins[kind].values()})
        raise UsageError(f"plugin '{plugin}' registered nothing here; loaded plugins: {', '.join(known)}")
    errors, skipped = [], []
    for kind, name in found:
        try:
            check(kind, name, registry, tmp_path, env)
        except ConformanceError as exc:
            errors.append(str(exc))
        except ConformanceSkip as exc:
            skipped.append(str(exc))
    if errors:
        raise ConformanceError("\n".join(errors))
    if len(skipped) == len(found):
        raise ConformanceSkip("; ".join(skipped))
    return [case for case in found if not any(s.startswith(f"{case[0]} '{case[1]}'") for s in skipped)]


# ------------------------------------------------------------------------------------------------
# pytest plugin: ``pytest_plugins = ["core.testing"]``.

try:
    import pytest
except ImportError:  # the suite's functions work without pytest
    pytest = None

if pytest is not None:

    class Conformance:
        """``fewstep_conformance.check(kind, name)`` / ``.check_plugin(name)``; skips become pytest skips."""

        def __init__(self, registry: Registry, tmp_path, teacher_run: Callable[[], str] | None = None):
            self.registry, self.env = registry, Env(str(tmp_path), registry, teacher_run)

        def check(self, kind: str, name: str) -> None:
            try:
                check(kind, name, self.registry, env=self.env)
            except ConformanceSkip as exc:
                pytest.skip(str(exc))

        def check_plugin(self, plugin: str) -> list:
            try:
                return check_plugin(plugin, self.registry, env=self.env)
            except ConformanceSkip as exc:
                pytest.skip(str(exc))

    @pytest.fixture
    def fewstep_registry():
        """A fresh registry (entry points loaded as FEWSTEP_PLUGINS says), the process default for the test.
        Add a plugin under development with ``fewstep_registry.add(module, name="mine")``."""
        import core.registry as registry_module

        previous = registry_module._default
        reg = Registry()
        registry_module.set_registry(reg)
        yield reg
        registry_module.set_registry(previous)

    @pytest.fixture
    def fewstep_conformance(fewstep_registry, tmp_path):
        """The conformance suite bound to ``fewstep_registry`` and a scratch dir."""
        return Conformance(fewstep_registry, tmp_path)
