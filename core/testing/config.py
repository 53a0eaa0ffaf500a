"""Configs: cattrs round trip (config.yaml reproduces a run) and every field settable from the CLI."""

from __future__ import annotations

import attrs
import yaml

from core.config import structure, unstructure
from core.errors import UsageError

from ._report import fail
from ._setup import KIND_GROUP, _cli


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
