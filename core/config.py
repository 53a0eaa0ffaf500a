"""Configs: attrs classes structured by cattrs from ``key=value`` overrides or a config.yaml.

A run's config has one group per plugin kind (``objective``, ``teacher``, ``student``, ``critic``,
``sampler``, ``data``), each ``{name: PLUGIN, **that plugin's attrs fields}``, plus ``train``, ``seed``,
``out`` and ``callbacks``. CLI values arrive as strings; the hooks below convert them strictly
(``train.steps=1.5`` is an error, not 1).
"""

from __future__ import annotations

import importlib.util
import math
import typing
from typing import Any, Literal

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from core.errors import UsageError, suggest

PLUGIN_GROUPS = ("objective", "teacher", "student", "critic", "sampler", "data")
GROUP_KIND = {"objective": "objective", "teacher": "teacher", "student": "student", "critic": "critic",
              "sampler": "sampler", "data": "dataset"}


class FieldError(ValueError):
    """A validator's complaint about one field; reported as ``group.field: message``."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def positive(instance, attribute, value):
    if value is not None and value <= 0:
        raise FieldError(attribute.name, f"must be > 0, got {value}")


def non_negative(instance, attribute, value):
    if value is not None and value < 0:
        raise FieldError(attribute.name, f"must be >= 0, got {value}")


def unit_interval(instance, attribute, value):
    if value is not None and not 0 <= value <= 1:
        raise FieldError(attribute.name, f"must be in [0, 1], got {value}")


def importable_optimizer(instance, attribute, value):
    """Checked when the config is read, so a missing optional package stops a run before it touches disk."""
    if value == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise FieldError(attribute.name, "adamw8bit needs bitsandbytes: pip install bitsandbytes "
                                         "(or use train.optimizer=adamw)")


def _prompts_or_path(value):
    """None, a list of prompts, or one path (a string that is not a [...] list)."""
    if isinstance(value, str) and value.strip().startswith("["):
        value = yaml.safe_load(value)
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ValueError(f"expected prompts [...] or a prompt file path, got {value!r}")


@attrs.define(kw_only=True)
class TrainConfig:
    """Runner settings shared by every objective."""

    steps: int = attrs.field(default=2000, validator=positive, metadata={"doc": "training iterations"})
    batch: int = attrs.field(default=256, validator=positive, metadata={"doc": "per-iteration batch size"})
    lr: float | None = attrs.field(default=None, validator=positive,
                                   metadata={"doc": "override every phase's learning rate"})
    warmup: int = attrs.field(default=0, validator=non_negative, metadata={"doc": "linear LR warmup iterations"})
    lr_decay: Literal["none", "linear", "cosine"] = attrs.field(
        default="none", metadata={"doc": "LR decay after warmup, to 0 at the last step"})
    grad_clip: float | None = attrs.field(default=10.0, validator=positive,
                                          metadata={"doc": "global grad-norm clip (none: off)"})
    ema: float = attrs.field(default=0.0, validator=unit_interval,
                             metadata={"doc": "student EMA decay (0: off); samples use the EMA when on"})
    ema_start: int = attrs.field(default=0, validator=non_negative, metadata={
        "doc": "iteration from which the EMA averages; before it the EMA copies the student, so a warm-up (e.g. "
               "objective=mm's teacher fit) leaves nothing of the initial network in the average"})
    log_every: int = attrs.field(default=50, validator=positive, metadata={"doc": "metrics.jsonl cadence"})
    eval_every: int = attrs.field(default=500, validator=non_negative,
                                  metadata={"doc": "quality metrics cadence when the teacher has exact samples (0: off)"})
    eval_samples: int = attrs.field(default=2000, validator=positive)
    ckpt_every: int = attrs.field(default=500, validator=positive, metadata={"doc": "checkpoint cadence"})
    preview_every: int = attrs.field(default=1000, validator=non_negative, metadata={"doc": "preview.png cadence (0: end only)"})
    validation_prompts: Any = attrs.field(default=None, converter=lambda v: _prompts_or_path(v), metadata={
        "doc": "callbacks=[validation]: prompts [...] or a prompt file, sampled every preview_every into "
               "previews/step-XXXXXX.png"})
    validation_seeds: int = attrs.field(default=4, validator=positive,
                                        metadata={"doc": "callbacks=[validation]: images per prompt (seeds seed, seed+1, ...)"})
    keep: int = attrs.field(default=2, validator=positive, metadata={"doc": "checkpoints kept"})
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = attrs.field(
        default="auto", metadata={"doc": "auto: bf16 autocast on CUDA, fp32 on CPU"})
    progress: bool = attrs.field(default=True, metadata={"doc": "tqdm progress bar"})
    nan_policy: Literal["stop", "skip"] = attrs.field(
        default="stop", metadata={"doc": "a non-finite loss or gradient: stop (error naming phase and step; the last "
                                         "checkpoint stays) or skip that optimizer step"})
    optimizer: Literal["adamw", "adamw8bit"] = attrs.field(
        default="adamw", validator=importable_optimizer,
        metadata={"doc": "adamw8bit: bitsandbytes' 8-bit AdamW (~2 bytes of state per parameter)"})
    # -- issue 15 (docs/memory.md, docs/benchmarks.md): added by the "shared" helper -------------------------
    dry_run: bool = attrs.field(default=False, metadata={
        "doc": "print the memory plan of this run (python -m core.run plan, same overrides) and exit; writes nothing"})
    compile: bool = attrs.field(default=False, metadata={
        "doc": "torch.compile each network's inner module in place (fewer host-side launches; the first steps "
               "compile); CPU needs a C compiler"})
    compile_mode: Literal["default", "regional", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = attrs.field(
        default="default", metadata={"doc": "torch.compile mode with train.compile=true; regional: only a diffusers "
                                            "model's repeated blocks (a minute of compiling, not several)"})
    # -- multi-process (torchrun); docs/distributed.md ---------------------------------------------------
    parallel: Literal["auto", "none", "ddp", "fsdp"] = attrs.field(
        default="auto", metadata={"doc": "under torchrun: ddp (replicated nets) or fsdp (FSDP2 fully_shard per block); "
                                         "auto: ddp on several ranks, none in one process"})
    grad_accum: int = attrs.field(default=1, validator=positive,
                                  metadata={"doc": "micro-batches per rank accumulated into each optimizer step"})
    batch_scope: Literal["global", "rank"] = attrs.field(
        default="global", metadata={"doc": "global: train.batch is split over ranks and grad_accum; "
                                           "rank: train.batch is each rank's micro-batch"})
    rng: Literal["shared", "per-rank"] = attrs.field(
        default="shared", metadata={"doc": "shared: every rank draws the global batch's randomness and keeps its rows "
                                           "(same result at any world size); per-rank: own stream per rank"})
    fsdp_offload: bool = attrs.field(default=False, metadata={"doc": "FSDP: keep sharded params, grads and "
                                                                     "optimizer state on CPU"})


# ------------------------------------------------------------------------------------------------
# Strict converter for CLI strings and YAML values.

def _fail(value, what):
    raise ValueError(f"expected {what}, got {value!r}")


def _to_int(value, _):
    if isinstance(value, bool):
        _fail(value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
    _fail(value, "an integer")


def _to_float(value, _):
    """A finite float: nan and inf are refused here, so no option can smuggle them into training."""
    if isinstance(value, bool):
        _fail(value, "a number")
    number = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        _fail(value, "a number")
    if not math.isfinite(number):
        _fail(value, "a finite number")
    return number


def _to_bool(value, _):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    _fail(value, "true or false")


def _to_str(value, _):
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    _fail(value, "a string")


def _is_optional(tp) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
        and type(None) in args and len(args) == 2


def _is_sequence(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _to_int)
    conv.register_structure_hook(float, _to_float)
    conv.register_structure_hook(bool, _to_bool)
    conv.register_structure_hook(str, _to_str)

    def optional(value, tp):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return conv.structure(value, inner)

    def sequence(value, tp):
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            _fail(value, "a list like [1,2] or 1,2")
        args = typing.get_args(tp)
        if typing.get_origin(tp) is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(conv.structure(v, args[0]) for v in value)
            if len(args) != len(value):
                _fail(value, f"{len(args)} values")
            return tuple(conv.structure(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return [conv.structure(v, inner) if inner is not Any else v for v in value]

    def literal(value, tp):
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or str(value) == str(c):
                return c
        raise ValueError(f"must be one of {', '.join(map(str, choices))}, got {value!r}{suggest(value, choices)}")

    conv.register_structure_hook_func(_is_optional, optional)
    conv.register_structure_hook_func(_is_sequence, sequence)
    conv.register_structure_hook_func(lambda tp: typing.get_origin(tp) is Literal, literal)
    conv.register_unstructure_hook_func(lambda tp: typing.get_origin(tp) is tuple, lambda v: list(v))
    return conv


converter = make_converter()


def _first_error(exc: BaseException, path: str) -> str:
    """One line out of a (possibly nested) cattrs validation error."""
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown key(s) {', '.join(sorted(exc.extra_fields))} in {path}"
    if isinstance(exc, (ClassValidationError, ExceptionGroup)):
        for sub in exc.exceptions:
            note = next((n for n in getattr(sub, "__notes__", []) if "@ attribute" in n), "")
            attr = note.rsplit("@ attribute", 1)[-1].strip() if note else ""
            return _first_error(sub, f"{path}.{attr}" if attr else path)
    if isinstance(exc, FieldError):
        return f"{path}.{exc.field}: {exc}"
    if isinstance(exc, ValueError) and len(exc.args) == 4 and isinstance(exc.args[1], attrs.Attribute):
        _, attribute, options, value = exc.args  # attrs.validators.in_: (message, attribute, options, value)
        choices = [str(o) for o in options]
        return f"{path}.{attribute.name}: must be one of {', '.join(choices)}, got {value!r}{suggest(value, choices)}"
    return f"{path}: {exc}"


def structure(data: dict, cls: type, path: str):
    """Build ``cls`` from ``data``; any problem becomes a one-line UsageError naming ``path.field``."""
    fields = [f.name for f in attrs.fields(cls)]
    for key in data:
        if key not in fields:
            hint = suggest(key, fields)
            listed = ", ".join(fields) if fields else "(none)"
            raise UsageError(f"unknown key '{path}.{key}'{hint}; {path} accepts: {listed}")
    try:
        return converter.structure(dict(data), cls)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(_first_error(exc, path)) from None


def unstructure(obj) -> dict:
    return converter.unstructure(obj)


def field_docs(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, doc) for ``help``."""
    rows = []
    for f in attrs.fields(cls):
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, str(tp).replace("typing.", ""), default, f.metadata.get("doc", "")))
    return rows


def parse_overrides(args: list[str]) -> dict:
    """``['a=1', 'b.c=x']`` -> ``{'a': '1', 'b': {'c': 'x'}}``, values kept as strings."""
    tree: dict = {}
    for arg in args:
        if "=" not in arg:
            raise UsageError(f"expected key=value, got '{arg}' (e.g. objective=dmd2 train.steps=500)")
        key, value = arg.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UsageError(f"malformed key '{key}'")
        node = tree
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                child = node[p] = {"name": child}
            node = child
        leaf = parts[-1]
        if isinstance(node.get(leaf), dict) and len(parts) == 1:
            node[leaf]["name"] = value
        else:
            node[leaf] = value
    return tree


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif isinstance(v, dict) and k in out and not isinstance(out[k], dict) and "name" not in v:
            out[k] = {"name": out[k], **v}  # ``callbacks: [a]`` plus ``callbacks.a.FIELD=VALUE``, as parse_overrides nests
        elif isinstance(out.get(k), dict) and not isinstance(v, dict):
            # ``teacher=gmm`` on top of a loaded ``teacher: {name: ...}``: switching plugin drops its fields
            out[k] = {"name": v} if out[k].get("name") != v else out[k]
        else:
            out[k] = v
    return out
