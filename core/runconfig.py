"""A run's resolved configuration: which plugin fills each role, each plugin's config, runner settings.

``resolve(tree)`` turns the nested dict from CLI overrides and/or a config.yaml into a ``RunConfig``;
``RunConfig.to_dict()`` is what config.yaml holds, so ``config=RUN/config.yaml`` reproduces a run.
"""

from __future__ import annotations

from typing import Any

import attrs

from core.config import GROUP_KIND, PLUGIN_GROUPS, TrainConfig, structure, unstructure
from core.errors import ConfigError, UsageError, suggest
from core.registry import Registry, get_registry

DEFAULTS = {"objective": "dmd2", "teacher": "gmm", "student": "auto", "critic": "auto", "sampler": "euler",
            "data": "auto"}
TOP_KEYS = (*PLUGIN_GROUPS, "train", "seed", "out", "callbacks")


@attrs.define
class Choice:
    name: str
    config: Any  # the plugin's attrs config instance (None when the plugin declares none)


@attrs.define
class RunConfig:
    objective: Choice
    teacher: Choice
    student: Choice
    critic: Choice | None
    sampler: Choice | None  # python -m core.sample's choice; None for a training run (its objective's sampler)
    data: Choice | None
    train: TrainConfig
    seed: int = 0
    out: str = ""
    callbacks: list[str] = attrs.Factory(list)
    callback_configs: dict[str, Any] = attrs.Factory(dict)  # name -> its config (absent: the defaults)

    def to_dict(self) -> dict:
        d: dict = {}
        for group in PLUGIN_GROUPS:
            choice = getattr(self, group)
            if choice is None and group == "sampler":  # a training run's config.yaml has no sampler to read
                continue
            if choice is None:
                d[group] = None
                continue
            fields = unstructure(choice.config) if choice.config is not None else {}
            d[group] = {"name": choice.name, **fields}
        d["train"] = unstructure(self.train)
        # callbacks=[a, b] alone, or with their configs in the shape callbacks.a.FIELD=VALUE parses to
        configs = {n: unstructure(c) for n, c in self.callback_configs.items() if c is not None}
        d.update(seed=self.seed, out=self.out,
                 callbacks={"name": list(self.callbacks), **configs} if configs else list(self.callbacks))
        return d


def _default_objective(registry: Registry) -> str:
    return DEFAULTS["objective"] if "dmd2" in registry.plugins["objective"] else "denoise"


def resolve(tree: dict, registry: Registry | None = None) -> RunConfig:
    registry = registry or get_registry()
    for key in tree:
        if key not in TOP_KEYS:
            raise UsageError(f"unknown key '{key}'{suggest(key, TOP_KEYS)}; top-level keys: {', '.join(TOP_KEYS)}")

    for key in ("out", "seed"):
        if isinstance(tree.get(key), (dict, list)):
            raise ConfigError(f"{key} takes one value, got {tree[key]!r}; e.g. {key}={'runs/mine' if key == 'out' else 1}")
    if tree.get("train") is not None and not isinstance(tree["train"], dict):
        raise ConfigError(f"train takes train.FIELD=VALUE settings, got train={tree['train']!r}; "
                          "see python -m core.run help train=")

    def group(name: str, default: str) -> tuple[str, dict]:
        value = tree.get(name)
        if value is None:
            return default, {}
        if isinstance(value, str):
            return value, {}
        if not isinstance(value, dict):
            raise UsageError(f"{name}: expected a plugin name, got {value!r}")
        fields = {k: v for k, v in value.items() if k != "name"}
        return str(value.get("name", default)), fields

    def build(name_group: str, plugin: str, fields: dict) -> Choice:
        info = registry.get(GROUP_KIND[name_group], plugin)
        if info.config is None:
            if fields:
                raise UsageError(f"{name_group} '{plugin}' takes no options, got {', '.join(fields)}")
            return Choice(plugin, None)
        return Choice(plugin, structure(fields, info.config, name_group))

    # a dataset may name the teacher that describes it (data=digits -> teacher=digits) when none is given
    default_teacher = DEFAULTS["teacher"]
    data_hint = group("data", DEFAULTS["data"])[0]
    if data_hint in registry.plugins["dataset"]:
        default_teacher = registry.get("dataset", data_hint).default_teacher or default_teacher
    teacher_name, teacher_fields = group("teacher", default_teacher)
    teacher = build("teacher", teacher_name, teacher_fields)
    teacher_info = registry.get("teacher", teacher_name)
    obj_name, obj_fields = group("objective", _default_objective(registry))
    objective = build("objective", obj_name, obj_fields)
    obj_info = registry.get("objective", obj_name)

    student_name, student_fields = group("student", DEFAULTS["student"])
    if student_name == "auto":  # the objective's need (e.g. SFD-v's NFE-conditioned copy), else the teacher's
        student_name = obj_info.default_student or teacher_info.default_student or "copy"
    student = build("student", student_name, student_fields)

    critic = None
    critic_name, critic_fields = group("critic", DEFAULTS["critic"])
    if getattr(obj_info.factory, "needs_critic", False):
        if critic_name == "auto":
            critic_name = obj_info.default_critic or "fake-score"
        critic = build("critic", critic_name, critic_fields)
    elif critic_fields or critic_name != "auto":
        raise UsageError(f"objective '{obj_name}' uses no critic; drop critic={critic_name}")

    sampler = None
    if "sampler" in tree:  # python -m core.sample; training runs preview and export with the objective's
        sampler = build("sampler", *group("sampler", DEFAULTS["sampler"]))

    data = None
    data_name, data_fields = group("data", DEFAULTS["data"])
    if data_name == "auto":
        data_name = teacher_info.default_data
    if data_name not in (None, "none"):
        data = build("data", data_name, data_fields)

    # an objective may suggest runner defaults (e.g. steps that fit its default budget); the user's win
    train_tree = {**obj_info.train_defaults, **(tree.get("train") or {})}
    train = structure(train_tree, TrainConfig, "train")
    from core.config import converter

    try:
        seed = converter.structure(tree.get("seed", 0), int)
    except ValueError as exc:
        raise UsageError(f"seed: {exc}") from None
    callbacks, configs = _callbacks(tree.get("callbacks"), registry)
    out = str(tree.get("out") or f"runs/{obj_name}-{teacher_name}")
    return RunConfig(objective, teacher, student, critic, sampler, data, train, seed, out, callbacks, configs)


def _callbacks(value, registry: Registry) -> tuple[list[str], dict]:
    """``callbacks=[a,b]`` (a list or its string), optionally with ``callbacks.a.FIELD=VALUE`` settings, which
    parse to ``{"name": "[a,b]", "a": {FIELD: VALUE}}``: the names and each named callback's config."""
    fields = {}
    if isinstance(value, dict):
        fields = {k: v for k, v in value.items() if k != "name"}
        value = value.get("name")
    names = value or []
    if isinstance(names, str):
        names = [c.strip() for c in names.strip("[]").split(",") if c.strip()]
    if not isinstance(names, list):
        raise UsageError(f"callbacks takes a list of callback names, got {names!r}; e.g. callbacks=[NAME]")
    for name, settings in fields.items():
        if name not in names:
            raise UsageError(f"callbacks.{name} is set but '{name}' is not in callbacks={names}; "
                             f"add it: callbacks=[{','.join([*names, name])}]")
        if not isinstance(settings, dict):
            raise UsageError(f"callbacks.{name} takes callbacks.{name}.FIELD=VALUE settings, got {settings!r}")
    configs = {}
    for name in names:
        info = registry.get("callback", name)
        settings = fields.get(name, {})
        if info.config is None:
            if settings:
                raise UsageError(f"callback '{name}' takes no options, got callbacks.{name}.{next(iter(settings))}")
            continue
        configs[name] = structure(settings, info.config, f"callbacks.{name}")
    return [str(n) for n in names], configs
