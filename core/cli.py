"""Shared CLI plumbing: one-line errors with exit code 2, help text for plugin configs."""

from __future__ import annotations

import sys

import fsspec
import yaml

from core.config import GROUP_KIND, TrainConfig, field_docs, merge, parse_overrides
from core.errors import UsageError
from core.registry import get_registry


def fail(msg: str) -> int:
    print(f"fewstep: error: {msg}", file=sys.stderr)
    return 2


def guard(main):
    """Run ``main(argv)``; a UsageError becomes one line on stderr and exit code 2."""
    def wrapped(argv=None):
        argv = sys.argv[1:] if argv is None else argv
        try:
            return main(argv) or 0
        except UsageError as exc:
            return fail(str(exc))
        except KeyboardInterrupt:
            print("fewstep: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
            return 130
    return wrapped


def load_tree(argv: list[str]) -> dict:
    """Overrides, on top of ``config=FILE`` when given."""
    tree = parse_overrides(argv)
    cfg_path = tree.pop("config", None)
    if cfg_path is None:
        return tree
    if isinstance(cfg_path, dict):
        raise UsageError("config= takes a path to a config.yaml")
    try:
        with fsspec.open(cfg_path, "r") as f:
            base = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UsageError(f"config={cfg_path}: no such file") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config={cfg_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(base, dict):
        raise UsageError(f"config={cfg_path}: expected a mapping of settings")
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
