"""Where the checks run: ``Env``, the settings a plugin declares (``declared_config``), and the small run
(``Setup``) built around it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any, Callable

import attrs
import torch
import yaml

from core.config import GROUP_KIND, PLUGIN_GROUPS, merge, parse_overrides, structure
from core.errors import UsageError
from core.registry import Registry

from ._report import ConformanceSkip, NeedsConfig


KIND_GROUP = {kind: group for group, kind in GROUP_KIND.items()}
TOP_KEYS = (*PLUGIN_GROUPS, "train", "seed", "out", "callbacks")
# Small, fast, exactly resumable runner settings; objectives' train_defaults are overridden by these.
TRAIN = {"batch": 16, "eval_every": 0, "eval_samples": 64, "preview_every": 0, "progress": False, "device": "cpu",
         "log_every": 1, "ckpt_every": 1, "keep": 2, "lr_decay": "none", "warmup": 0}


@attrs.define
class Env:
    """What a ``conformance_config(env)`` function gets: a scratch dir, the registry, and ``teacher_run()``,
    the out= dir of a trained ``objective=denoise`` cls4 run (for ``teacher=checkpoint``-style plugins)."""

    tmp: str
    registry: Registry
    teacher_run_fn: Callable[[], str] | None = None

    def teacher_run(self) -> str:
        return self.teacher_run_fn() if self.teacher_run_fn is not None else _trained_teacher_run(self.registry)


_TEACHER_RUNS: dict[int, str] = {}


def _trained_teacher_run(registry: Registry) -> str:
    """A small denoise run on cls4 (ring8 with 4 classes; trained once per process): a class-conditional network
    teacher good enough that its x0 beats the trivial estimators, so its guidance is checked too."""
    if id(registry) not in _TEACHER_RUNS:
        from core.runner import Trainer

        tmp = tempfile.mkdtemp(prefix="fewstep-conformance-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        out = os.path.join(tmp, "teacher")
        tree = parse_overrides(["objective=denoise", "teacher=gmm", "teacher.preset=cls4", "student=mlp",
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
    ("teacher", "gmm"): lambda env: ["teacher=gmm", "teacher.preset=cls4"],  # class-conditional: guidance checked
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
