"""fewstep's hooks. Each takes a ``register(name, factory, config=None)`` callback; see docs/plugins.md.

Factories: teacher(config, device); student(config, teacher, device); critic(config, teacher,
student, device); objective(config); dataset(config, teacher); callback(config); a sampler is the
sampling function itself. ``config`` is an attrs class whose instance the factory receives.
"""

import pluggy

hookspec = pluggy.HookspecMarker("fewstep")


@hookspec
def register_teachers(register):
    """Register frozen teacher models (``teacher=NAME``)."""


@hookspec
def register_students(register):
    """Register trainable student (generator) networks (``student=NAME``)."""


@hookspec
def register_critics(register):
    """Register critics: fake-score / auxiliary networks (``critic=NAME``)."""


@hookspec
def register_objectives(register):
    """Register distillation objectives (``objective=NAME``)."""


@hookspec
def register_samplers(register):
    """Register sampling functions (``sampler=NAME``)."""


@hookspec
def register_datasets(register):
    """Register datasets of real data and conditions (``data=NAME``)."""


@hookspec
def register_callbacks(register):
    """Register run callbacks (``callbacks=[NAME, ...]``)."""
