"""An example fewstep plugin. fewstep loads this module through the ``fewstep`` entry point in
pyproject.toml and calls the hook implementations below with a ``register`` callback."""

from core import hookimpl
from fewstep_example.churn import ChurnConfig, euler_churn
from fewstep_example.consistency import ConsistencyConfig, ConsistencyDistillation


@hookimpl
def register_objectives(register):
    register("example-cd", ConsistencyDistillation, config=ConsistencyConfig)


@hookimpl
def register_samplers(register):
    register("example-churn", euler_churn, config=ChurnConfig)
