"""Plugin registry on pluggy. Built-ins and third-party plugins load the same way: entry points in
the ``fewstep`` group.

``FEWSTEP_PLUGINS=a,b`` loads only those entry points; ``FEWSTEP_PLUGINS=`` (empty) loads none (tests
register their own); ``FEWSTEP_DISABLE_PLUGINS=a,b`` blocks some.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import Any, Callable

import attrs
import pluggy

from core import hookspecs
from core.errors import PluginError, unknown

KINDS = ("teacher", "student", "critic", "objective", "sampler", "dataset", "callback")
_HOOKS = {kind: f"register_{kind}s" for kind in KINDS}
ENTRY_POINT_GROUP = "fewstep"


class DuplicatePluginError(PluginError):
    pass


def _filter_note(only: str | None, allowed: set | None, blocked: set, available: list[str]) -> str:
    """What FEWSTEP_PLUGINS / FEWSTEP_DISABLE_PLUGINS filtered, for 'unknown plugin' errors."""
    notes = []
    if allowed is not None:
        typos = sorted(allowed - set(available))
        notes.append(f"FEWSTEP_PLUGINS={only} loads only those entry points"
                     + (f" and names unknown ones: {', '.join(typos)}" if typos else "")
                     + f" (installed: {', '.join(sorted(available)) or 'none'}); unset it or fix the list")
    if blocked & set(available):
        notes.append(f"FEWSTEP_DISABLE_PLUGINS skips {', '.join(sorted(blocked & set(available)))}")
    return "; ".join(notes)


@attrs.define
class PluginInfo:
    """One registered plugin: what ``register(name, factory, config=None, **defaults)`` was given."""

    kind: str
    name: str
    factory: Callable
    config: type | None
    plugin: str  # the pluggy plugin (entry point) name that registered it
    dist: str  # the distribution it came from
    default_student: str | None = None  # teacher or objective: the student for student=auto
    default_critic: str | None = None  # objective with needs_critic: the critic for critic=auto
    default_data: str | None = None  # teacher: the dataset for data=auto
    train_defaults: dict = attrs.Factory(dict)  # objective: suggested train.* settings (the user's win)
    default_teacher: str | None = None  # dataset: the teacher for a run that names none (data=digits)

    @property
    def doc(self) -> str:
        doc = (self.factory.__doc__ or "").strip().split("\n\n")[0]
        first = " ".join(doc.split())
        return first if len(first) <= 90 else first[:87] + "..."


class Registry:
    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager("fewstep")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, dict[str, PluginInfo]] = {k: {} for k in KINDS}
        self.failed: dict[str, str] = {}  # entry point name -> error line
        self.filtered: list[str] = []  # entry points skipped by FEWSTEP_PLUGINS / FEWSTEP_DISABLE_PLUGINS
        self._env_note = ""
        if load_entry_points:
            self.load_entry_points()

    # -- loading -----------------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        only = os.environ.get("FEWSTEP_PLUGINS")
        allowed = None if only is None else {s.strip() for s in only.split(",") if s.strip()}
        blocked = {s.strip() for s in os.environ.get("FEWSTEP_DISABLE_PLUGINS", "").split(",") if s.strip()}
        available = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            available.append(ep.name)
            if (allowed is not None and ep.name not in allowed) or ep.name in blocked:
                self.filtered.append(ep.name)
                continue
            if self.pm.has_plugin(ep.name):
                continue
            dist = ep.dist.name if ep.dist is not None else "unknown"
            try:
                self.add(ep.load(), name=ep.name, dist=dist)
            except DuplicatePluginError:
                raise
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a broken plugin (even one calling sys.exit) is reported, not fatal
                self.failed[ep.name] = f"{type(exc).__name__}: {exc}"
        self._env_note = _filter_note(only, allowed, blocked, available)

    def add(self, plugin: Any, name: str | None = None, dist: str = "local") -> None:
        """Register a plugin object (module or class) and collect what it registers; a hook that fails
        half-way leaves nothing behind (the plugin and everything it registered are removed)."""
        name = name or getattr(plugin, "__name__", repr(plugin))
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()  # an implementation of an unknown hook is an error (tox-style)
        except pluggy.PluginValidationError:
            self.pm.unregister(name=name)
            raise
        try:
            for kind, hook in _HOOKS.items():
                for impl in getattr(self.pm.hook, hook).get_hookimpls():
                    if impl.plugin_name == name:
                        impl.function(register=self._registrar(kind, name, dist))
        except BaseException:
            self.remove(name)
            raise

    def remove(self, name: str) -> None:
        self.pm.unregister(name=name)
        for kind in KINDS:
            for pname in [n for n, info in self.plugins[kind].items() if info.plugin == name]:
                del self.plugins[kind][pname]

    def _registrar(self, kind: str, plugin: str, dist: str):
        def register(name: str, factory: Callable, config: type | None = None, *, default_student: str | None = None,
                     default_critic: str | None = None, default_data: str | None = None,
                     train_defaults: dict | None = None, default_teacher: str | None = None) -> None:
            existing = self.plugins[kind].get(name)
            if existing is not None:
                raise DuplicatePluginError(
                    f"{kind} '{name}' is registered twice: by plugin '{existing.plugin}' ({existing.dist}) "
                    f"and by plugin '{plugin}' ({dist}); uninstall one or disable it with "
                    f"FEWSTEP_DISABLE_PLUGINS={plugin}")
            if config is not None and not attrs.has(config):
                raise TypeError(f"{kind} '{name}': config must be an attrs class, got {config!r}")
            # defaults set as attributes of the factory (the older form) still count
            self.plugins[kind][name] = PluginInfo(
                kind, name, factory, config, plugin, dist,
                default_student or getattr(factory, "default_student", None),
                default_critic or getattr(factory, "default_critic", None),
                default_data or getattr(factory, "default_data", None),
                dict(train_defaults if train_defaults is not None else getattr(factory, "train_defaults", {}) or {}),
                default_teacher)

        return register

    # -- lookup ------------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> PluginInfo:
        table = self.plugins[kind]
        if name in table:
            return table[name]
        if name in self.failed:
            raise PluginError(f"{kind} plugin '{name}' failed to import: {self.failed[name]}; fix or reinstall "
                              f"it, or skip it with FEWSTEP_DISABLE_PLUGINS={name}")
        err = unknown(kind, name, table)
        if self.failed:
            broken = "; ".join(f"{k} ({v})" for k, v in self.failed.items())
            err = PluginError(f"{err}; plugins that failed to import: {broken}")
        if self._env_note:
            err = PluginError(f"{err}; {self._env_note}")
        raise err

    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])

    def describe(self) -> str:
        """Every plugin by kind with its distribution (``python -m core.run list``)."""
        lines = []
        for kind in KINDS:
            lines.append(f"{kind}s:")
            for name in sorted(self.plugins[kind]):
                info = self.plugins[kind][name]
                origin = "built-in" if info.dist == "fewstep" else "third-party"
                lines.append(f"  {name:<16} {info.dist} ({origin}){'  ' + info.doc if info.doc else ''}")
            if not self.plugins[kind]:
                lines.append("  (none)")
        for name, err in self.failed.items():
            lines.append(f"failed to import: {name}: {err}")
        return "\n".join(lines)


_default: Registry | None = None


def get_registry() -> Registry:
    global _default
    if _default is None:
        _default = Registry()
    return _default


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests)."""
    global _default
    _default = registry


def warn(msg: str) -> None:
    print(f"fewstep: warning: {msg}", file=sys.stderr)
