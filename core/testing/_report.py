"""Collecting problems: the conformance exceptions, ``fail`` and ``Report`` (each check section is independent;
a plugin author sees them all at once), plus small helpers the checks share."""

from __future__ import annotations

import inspect
import os
import traceback
from typing import Callable

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__))  # frames in the suite itself are not "where" a plugin failed


class ConformanceError(AssertionError):
    """A plugin breaks a contract. The message lists each problem and what to change."""


class ConformanceSkip(Exception):
    """The plugin asked not to be checked here (``conformance_skip``)."""


class NeedsConfig(ConformanceSkip):
    """The plugin cannot be built in the default setting and declares no ``conformance_config``."""


def fail(problem: str, fix: str):
    raise ConformanceError(f"{problem}; fix: {fix}")


class Report:
    FAILED = object()

    def __init__(self, kind: str, name: str):
        self.label = f"{kind} '{name}'"
        self.problems: list[str] = []

    def run(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConformanceSkip:
            raise
        except ConformanceError as exc:
            self.problems.append(f"[{what}] {exc}")
        except Exception as exc:  # the plugin raised: say where
            self.problems.append(f"[{what}] raised {type(exc).__name__}: {exc} ({_where(exc)})")
        return Report.FAILED

    def done(self) -> None:
        if self.problems:
            raise ConformanceError(f"{self.label} fails the fewstep conformance suite:\n  - "
                                   + "\n  - ".join(self.problems))


def _where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if os.path.dirname(os.path.abspath(f.filename)) != _PACKAGE]
    if not frames:
        return "in core/testing/"
    f = frames[-1]
    return f"at {os.path.relpath(f.filename) if not f.filename.startswith('<') else f.filename}:{f.lineno} in {f.name}"


def _accepts(fn: Callable, *args, **kwargs) -> str | None:
    """None if ``fn`` can be called with these arguments, else its signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(*args, **kwargs)
        return None
    except TypeError:
        return f"{getattr(fn, '__name__', 'it')}{sig}"


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> tuple[bool, float]:
    a, b = a.detach().double(), b.detach().double()
    if not a.numel():
        return True, 0.0
    diff = float((a - b).abs().max())
    return diff <= rel * (1.0 + float(b.abs().max())), diff
