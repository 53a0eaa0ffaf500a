"""fewstep core: protocols, schedules, registry, configs, runner. Knows no method."""

import pluggy

hookimpl = pluggy.HookimplMarker("fewstep")

__all__ = ["hookimpl"]
