"""Shared CLI plumbing: one-line errors with exit code 2, help text for plugin configs."""

from __future__ import annotations

import os
import sys
import traceback

from core.config import GROUP_KIND, TrainConfig, field_docs, merge, parse_overrides
from core.errors import ConfigError, UsageError, storage_error
from core.registry import get_registry


def fail(msg: str) -> int:
    print(f"fewstep: error: {msg}", file=sys.stderr)
    return 2


def debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("FEWSTEP_DEBUG", "0") not in ("", "0")


def guard(main):
    """Run ``main(argv)``; a UsageError (or a full disk / read-only OSError) becomes one line on stderr and
    exit code 2. Other exceptions are bugs and keep their traceback. ``--debug`` / ``FEWSTEP_DEBUG=1``
    print the traceback of user errors too."""
    def wrapped(argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = debug_enabled(argv)
        argv = [a for a in argv if a != "--debug"]
        try:
            return main(argv) or 0
        except UsageError as exc:
            if debug:
                traceback.print_exc()
            return fail(str(exc))
        except OSError as exc:
            err = storage_error(exc)
            if err is None:
                raise
            if debug:
                traceback.print_exc()
            return fail(str(err))
        except KeyboardInterrupt:
            print("fewstep: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
            return 130
    wrapped.__doc__ = main.__doc__
    return wrapped


def load_tree(argv: list[str]) -> dict:
    """Overrides, on top of ``config=FILE`` when given."""
    tree = parse_overrides(argv)
    cfg_path = tree.pop("config", None)
    if cfg_path is None:
        return tree
    if isinstance(cfg_path, dict):
        raise ConfigError("config= takes a path to a config.yaml (got sub-keys config.*); e.g. config=RUN/config.yaml")
    from core.files import read_yaml

    base = read_yaml(str(cfg_path), what=f"config={cfg_path}", fix="pass the config.yaml of a run, "
                     "e.g. config=runs/dmd2-gmm/config.yaml")
    if not isinstance(base, dict):
        raise ConfigError(f"config={cfg_path} holds a {type(base).__name__}, not a mapping of settings; "
                          "pass the config.yaml of a run")
    for group, value in base.items():
        if group in ("train", *GROUP_KIND) and value is not None and not isinstance(value, (dict, str)):
            raise ConfigError(f"config={cfg_path}: '{group}' holds {value!r}; it must be a mapping of settings "
                              f"(or a plugin name)")
    return merge(base, tree)


def _format_fields(cls) -> list[str]:
    rows = []
    for name, tp, default, doc in field_docs(cls):
        rows.append(f"    {name:<18} {tp:<22} default {default!r}{'  ' + doc if doc else ''}")
    return rows or ["    (no options)"]


def help_text(tree: dict) -> str:
    reg = get_registry()
    lines = []
    asked = [g for g in GROUP_KIND if g in tree]
    for group in asked:
        value = tree[group]
        name = value if isinstance(value, str) else value.get("name")
        info = reg.get(GROUP_KIND[group], name)
        lines.append(f"{group}={name}  ({info.dist}): {info.doc}")
        lines += _format_fields(info.config) if info.config else ["    (no options)"]
    if not asked or "train" in tree:
        lines.append("train.*  (runner settings)")
        lines += _format_fields(TrainConfig)
    if not asked:
        lines.insert(0, "usage: python -m core.run [objective=NAME] [teacher=NAME] [student=..] [critic=..] "
                        "[data=..] [group.field=value ...] [train.steps=N] [seed=N] [out=DIR]\n"
                        "       python -m core.run list | help objective=NAME | config=RUN/config.yaml\n")
    return "\n".join(lines)
