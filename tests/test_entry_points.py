"""No built-in can drop out silently: the conformance suite and the CLI see only what the entry points load,
so a plugin module missing from pyproject.toml, a stale install, or an entry point that registers nothing
must fail here (not skip somewhere else)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from core.registry import ENTRY_POINT_GROUP, KINDS, Registry

ROOT = Path(__file__).resolve().parents[1]
DECLARED = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]


def _plugin_modules() -> set[str]:
    """Every module under plugins/ that implements a hook (a ``@hookimpl`` line), as a dotted name; a package
    whose __init__ implements hooks is named by the package."""
    found = set()
    for path in (ROOT / "plugins").rglob("*.py"):
        if re.search(r"^@hookimpl\b", path.read_text(), re.M):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found.add(".".join(parts))
    return found


def test_every_plugin_module_is_declared_as_an_entry_point():
    missing = _plugin_modules() - set(DECLARED.values())
    assert not missing, f"plugin modules with hooks but no [project.entry-points.fewstep] line: {sorted(missing)}"


def test_installed_entry_points_match_pyproject():
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
                 if ep.dist is not None and ep.dist.name == "fewstep"}
    assert installed == DECLARED, "stale install: run `pip install --no-deps -e .` (make setup) after editing pyproject"


def test_every_entry_point_loads_and_registers_something():
    reg = Registry()
    assert not reg.failed, reg.failed
    registered = {info.plugin for kind in KINDS for info in reg.plugins[kind].values()}
    silent = set(DECLARED) - registered
    assert not silent, f"entry points that registered no plugin: {sorted(silent)}"
