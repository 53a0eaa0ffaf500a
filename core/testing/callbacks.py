"""Callbacks: built as the runner builds them (factory(None)); hook methods take the runner's arguments."""

from __future__ import annotations

from ._report import Report, _accepts, fail
from ._setup import Setup


_CALLBACK_HOOKS = {"on_start": 1, "on_log": 2, "on_checkpoint": 2, "on_end": 1}


def check_callback(setup: Setup, rep: Report) -> None:
    def hooks():
        cb = setup.info.factory(None)
        found = [h for h in _CALLBACK_HOOKS if callable(getattr(cb, h, None))]
        if not found:
            fail("callback has none of on_start, on_log, on_checkpoint, on_end", "define at least one")
        for h in found:
            sig = _accepts(getattr(cb, h), *[None] * _CALLBACK_HOOKS[h])
            if sig:
                args = "trainer" if _CALLBACK_HOOKS[h] == 1 else ("trainer, record" if h == "on_log" else "trainer, path")
                fail(f"callback.{sig} cannot be called as {h}({args})", f"define {h}(self, {args})")

    rep.run("hooks", hooks)
