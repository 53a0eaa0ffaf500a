"""Callbacks: built as the runner builds them (``factory(config)``); they implement lifecycle hooks
(core.hookspecs ``fewstep_*``) whose argument names the run's plugin manager accepts."""

from __future__ import annotations

import pluggy

from core import hookspecs

from ._report import Report, fail
from ._setup import Setup


def check_callback(setup: Setup, rep: Report) -> None:
    def hooks():
        info = setup.info
        cb = info.factory(info.config() if info.config is not None else None)
        pm = pluggy.PluginManager("fewstep")
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(cb, name="callback-under-test")
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            fail(f"callback's hooks do not match core.hookspecs: {exc}",
                 "name the methods fewstep_run_start, fewstep_log, ... with the spec's argument names")
        found = [impl.name for impl in pm.get_hookcallers(cb) or []]
        if not any(name.startswith("fewstep_") for name in found):
            fail("callback implements no lifecycle hook", "decorate a method such as fewstep_log(self, trainer, "
                 "record) with @core.hookimpl")

    rep.run("hooks", hooks)
