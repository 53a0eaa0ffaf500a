"""Student networks: a fresh residual MLP (vector data) or a trainable copy of the teacher's network."""

from __future__ import annotations

import attrs

from core import hookimpl
from core.config import FieldError, positive
from core.errors import UsageError
from core.networks import DenoiserNet, ResidualMLP
from core.protocols import sigma_data_of


def even_count(instance, attribute, value):
    if value is not None and (value < 0 or value % 2):
        raise FieldError(attribute.name, f"must be an even number >= 0 (a cos and a sin per frequency), got {value}")


# Random Fourier features help where the data are low-dimensional coordinates (Tancik et al. 2020). Measured
# (docs/methods/quality.md, fourth and seventh passes): DMD2 3-6x lower energy distance on every 2-D preset and
# seed, MM and mm-param 3-9x on ring8; but DMD2 2.4x worse on the 16-D preset, hence the dimension cut-off
AUTO_FOURIER_FEATURES = 128
AUTO_FOURIER_MAX_DIM = 3


def fourier_features_for(config, dim: int) -> int:
    """The configured count, or when unset the measured default for ``dim``-dimensional data."""
    if config.fourier_features is not None:
        return config.fourier_features
    return AUTO_FOURIER_FEATURES if dim <= AUTO_FOURIER_MAX_DIM else 0


@attrs.define(kw_only=True)
class MLPConfig:
    hidden: int = attrs.field(default=256, validator=positive, metadata={"doc": "width"})
    depth: int = attrs.field(default=4, validator=positive, metadata={"doc": "residual blocks"})
    emb_dim: int = attrs.field(default=128, validator=positive, metadata={"doc": "Fourier time-embedding size"})
    fourier_features: int | None = attrs.field(
        default=None, validator=even_count,
        metadata={"doc": "random Fourier features of the input (cos + sin, even; 0: the plain input; unset: "
                         f"{AUTO_FOURIER_FEATURES} for data of dimension <= {AUTO_FOURIER_MAX_DIM}, else 0)"})
    fourier_scale: float = attrs.field(default=1.0, validator=positive,
                                       metadata={"doc": "std of the Fourier frequencies per unit of c_in * x"})
    sigma_data: float | None = attrs.field(default=None, validator=positive,
                                           metadata={"doc": "data std for preconditioning (default: the teacher's)"})


def mlp_student(config: MLPConfig, teacher, device="cpu"):
    """Residual MLP with EDM-style preconditioning on the teacher's schedule (vector data)."""
    if len(teacher.data_shape) != 1:
        raise UsageError(f"student=mlp is for vector data; the teacher's data has shape {tuple(teacher.data_shape)}")
    backbone = ResidualMLP(teacher.data_shape[0], config.hidden, config.depth, config.emb_dim,
                           getattr(teacher, "num_classes", 0), fourier_features_for(config, teacher.data_shape[0]),
                           config.fourier_scale)
    sigma_data = config.sigma_data or sigma_data_of(teacher)
    return DenoiserNet(backbone, teacher.schedule, "edm", sigma_data).to(device)


@attrs.define(kw_only=True)
class CopyConfig:
    pass


def copy_student(config: CopyConfig, teacher, device="cpu"):
    """A trainable copy of the teacher's own network (initialised from the teacher's weights)."""
    net = teacher.trainable_copy()
    if net is None:
        raise UsageError(f"student=copy needs a teacher with a network; {type(teacher).__name__} has none "
                         "(use student=mlp)")
    return net.to(device)


@hookimpl
def register_students(register):
    register("mlp", mlp_student, config=MLPConfig)
    register("copy", copy_student, config=CopyConfig)
