"""The conformance suite (core.testing) over every built-in plugin, and the author's guide
(docs/plugins.md), datasette-style: every hook in core/hookspecs.py is documented with its exact
signature, and each hook's example in the guide passes the suite."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest

from core import hookspecs, testing
from core.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "plugins.md").read_text()

# Parametrized from the registry at collection time: plugins other engineers add are covered automatically.
# The diffusers models and data need pipelines: tests/test_conformance_diffusers.py checks them on tiny ones.
REGISTRY = Registry()
BUILTINS = [case for case in testing.cases(REGISTRY, dist="fewstep")
            if REGISTRY.get(*case).plugin != "diffusers" or case[0] == "callback"]
HOOKS = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "fewstep_spec")}
REGISTER_HOOKS = sorted(h for h in HOOKS if h.startswith("register_"))
HOOK_KIND = {f"register_{kind}s": kind for kind in testing.CHECKS}


@pytest.mark.parametrize("kind,name", BUILTINS, ids=[f"{k}-{n}" for k, n in BUILTINS])
def test_builtin_plugin_conforms(kind, name, tmp_path):
    testing.check(kind, name, REGISTRY, tmp_path)  # a skip (ConformanceSkip, NeedsConfig) fails here


def test_builtins_import_cleanly():
    """A built-in that fails to import would silently drop out of the parametrization above."""
    assert not REGISTRY.failed


def test_every_kind_has_builtins_under_test():
    assert {kind for kind, _ in BUILTINS} >= {"teacher", "student", "critic", "objective", "sampler", "dataset"}


# -- the author's guide -------------------------------------------------------------------------------
def _section(hook: str) -> str:
    parts = re.split(r"^## ", GUIDE, flags=re.M)
    return next(p for p in parts if p.startswith(hook + "("))


def test_hooks_match_the_plugin_kinds():
    assert set(REGISTER_HOOKS) == set(HOOK_KIND)
    assert all(h.startswith("fewstep_") for h in set(HOOKS) - set(REGISTER_HOOKS))  # the run's lifecycle


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_is_documented_with_its_signature(hook):
    heading = f"## {hook}{inspect.signature(HOOKS[hook])}"
    assert heading in GUIDE.splitlines(), f"docs/plugins.md needs a section headed exactly '{heading}'"


@pytest.mark.parametrize("hook", REGISTER_HOOKS)
def test_hook_example_in_the_guide_passes_the_suite(hook, tmp_path):
    """The guide's minimal example of each hook is a working plugin: load it as one and check it."""
    code = re.search(r"```python\n(.*?)```", _section(hook), re.S).group(1)
    module = types.ModuleType(f"docs_example_{hook}")
    exec(compile(code, f"docs/plugins.md ({hook})", "exec"), module.__dict__)
    registry = Registry()
    registry.add(module, name=f"docs-{hook}")
    checked = testing.check_plugin(f"docs-{hook}", registry, tmp_path)
    assert checked and {kind for kind, _ in checked} == {HOOK_KIND[hook]}


# -- how a plugin declares its conformance settings ----------------------------------------------------
def test_conformance_config_and_skip_on_the_factory(tmp_path):
    """A student whose config has a required field: NeedsConfig without settings, passes with its own key
    (no group prefix) in conformance_config, and conformance_skip skips it."""
    import attrs

    from core import hookimpl
    from plugins.students import MLPConfig, mlp_student

    @attrs.define(kw_only=True)
    class WidthConfig:
        hidden: int

    def width_student(config, teacher, device="cpu"):
        """MLP of a required width."""
        return mlp_student(MLPConfig(hidden=config.hidden, depth=1), teacher, device)

    module = types.ModuleType("width_plugin")
    module.register_students = hookimpl(lambda register: register("width", width_student, config=WidthConfig))
    registry = Registry()
    registry.add(module, name="width")
    with pytest.raises(testing.NeedsConfig, match="conformance_config"):
        testing.check("student", "width", registry, tmp_path / "a")
    width_student.conformance_config = {"hidden": 16}
    testing.check("student", "width", registry, tmp_path / "b")
    width_student.conformance_skip = "needs a GPU"
    with pytest.raises(testing.ConformanceSkip, match="needs a GPU"):
        testing.check("student", "width", registry, tmp_path / "c")
