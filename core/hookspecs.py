"""fewstep's hooks: ``register_*`` (each takes a ``register(name, factory, config=None, **info)`` callback)
and a run's lifecycle events (``fewstep_*``). See docs/plugins.md.

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


# -- a run's lifecycle -----------------------------------------------------------------------------------
# Called on the objects a run registers on its own plugin manager: the built-in jobs (core.runlog's metrics
# log and TensorBoard, core.evaluation's evaluation and preview, core.runstate's EMA) and the callbacks named in
# ``callbacks=[...]`` (rank 0 only). See docs/architecture.md for the order within one iteration.

@hookspec
def fewstep_run_start(trainer, start):
    """The run is built and restored; ``start`` is the first iteration it will train."""


@hookspec
def fewstep_phase_loss(trainer, phase, loss, metrics):
    """A phase computed ``loss`` (before its backward); once per loss and micro-batch."""


@hookspec
def fewstep_before_optimizer_step(trainer, phase, optimizer, grad_norm):
    """``phase``'s gradients are accumulated and clipped; ``optimizer`` steps next. ``grad_norm``: their total norm
    before clipping (a 0-d tensor on the device), None when ``train.grad_clip`` is off."""


@hookspec
def fewstep_after_phase(trainer, phase, iteration, metrics):
    """``phase`` made all its optimizer steps of ``iteration``; ``metrics`` are what it logs."""


@hookspec
def fewstep_log(trainer, record):
    """A metrics record is due (``tryfirst`` implementations may add entries before it is written)."""


@hookspec
def fewstep_iteration_end(trainer, step):
    """Iteration ``step - 1`` is complete (logged, before its checkpoint)."""


@hookspec
def fewstep_checkpoint(trainer, path):
    """A checkpoint was written to ``path``."""


@hookspec
def fewstep_run_end(trainer, result):
    """Training is over and the student exported; ``result`` is the dict the run returns (entries may be added)."""
