"""student=mlp's Fourier-feature default: on for low-dimensional data, off above (plugins/students.py; the
measurements behind it are in docs/methods/quality.md)."""

import pytest

from core.config import parse_overrides
from core.runconfig import resolve
from plugins.gmm import GaussianMixtureTeacher, GMMConfig
from plugins.students import AUTO_FOURIER_FEATURES, MLPConfig, mlp_student


def lifted_width(net) -> int:
    return net.backbone.inp.in_features


@pytest.mark.parametrize("preset, dim, fourier", [("ring8", 2, True), ("cls4", 2, True), ("hd16", 16, False)])
def test_unset_fourier_features_lift_2d_data_and_leave_16d_data_plain(preset, dim, fourier):
    net = mlp_student(MLPConfig(), GaussianMixtureTeacher(GMMConfig(preset=preset)))
    assert (net.backbone.fourier is not None) == fourier
    assert lifted_width(net) == dim + (AUTO_FOURIER_FEATURES if fourier else 0)


@pytest.mark.parametrize("preset", ["ring8", "hd16"])
def test_an_explicit_count_wins_over_the_default_in_any_dimension(preset):
    teacher = GaussianMixtureTeacher(GMMConfig(preset=preset))
    assert mlp_student(MLPConfig(fourier_features=0), teacher).backbone.fourier is None
    assert mlp_student(MLPConfig(fourier_features=8), teacher).backbone.fourier.freqs.shape == (4, teacher.data_shape[0])


def test_the_default_stays_unset_in_the_run_config_and_zero_parses_as_plain():
    assert resolve(parse_overrides([])).student.config.fourier_features is None
    assert resolve(parse_overrides(["student.fourier_features=0"])).student.config.fourier_features == 0
