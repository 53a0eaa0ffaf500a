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

The checks live in one module per plugin kind (``teachers``, ``networks`` for students and critics,
``datasets``, ``samplers``, ``objectives``, ``callbacks``); every public name is importable from here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable

import attrs
import torch

from core.errors import UsageError
from core.registry import KINDS, Registry, get_registry

# The suite's parts, one module per concern; their public names are re-exported here.
from ._report import ConformanceError, ConformanceSkip, NeedsConfig, Report, _where, fail
from ._setup import BUILTIN_CONFIGS, KIND_GROUP, TOP_KEYS, TRAIN, Env, Setup, declared_config
from .callbacks import check_callback
from .config import check_config
from .datasets import check_dataset
from .denoisers import check_denoiser
from .networks import check_critic, check_student
from .objectives import check_objective
from .samplers import SAMPLER_SIGNATURE, GaussianDenoiser, GuidedGaussianDenoiser, PointMassDenoiser, check_sampler
from .teachers import check_teacher


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
