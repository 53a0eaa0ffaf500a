"""Slow: distillation improves real images. A small class-conditional UNet teacher on the digits (about
2 min on 2 cores), then SFD at NFE 2 from it (about 1 min); scored with the digits FID (plugins.digits.fid)."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")

from conftest import train  # noqa: E402

from core.protocols import SamplingSpec  # noqa: E402
from core.rundir import load_run  # noqa: E402
from core.generation import generate  # noqa: E402
from core.timesteps import make_grid  # noqa: E402
from plugins.digits import fid as digits_metrics  # noqa: E402

pytestmark = pytest.mark.slow
QUIET = ["train.progress=false", "train.eval_every=0", "train.preview_every=0"]


@pytest.fixture(scope="module", autouse=True)
def _classifier_cache(digits_classifier_cache):
    """Before any module fixture that scores samples (conftest.digits_classifier_cache)."""


def _report(model, spec, shape, num=500):
    labels = torch.arange(num) % 10
    torch.manual_seed(123)
    return digits_metrics.digits_report(generate(model, spec, num, labels, batch=500, shape=shape), labels)


def test_sfd_student_beats_the_teachers_2_nfe_solvers_by_2x(tmp_path):
    teacher_dir = str(tmp_path / "teacher")
    train("objective=denoise", "data=digits", "student=unet", "student.channels=[16,32]", "train.steps=1000",
          "train.batch=128", "train.ema=0.99", *QUIET, f"out={teacher_dir}")
    networks, _, _ = load_run(teacher_dir)
    teacher, shape = networks.student, networks.teacher.data_shape
    teacher_fid = {s: _report(teacher, SamplingSpec(s, make_grid(teacher.schedule, 2).tolist(), {}), shape)["fid"]
                   for s in ("euler", "dpmpp-2m", "ancestral")}
    reference = _report(teacher, SamplingSpec("dpmpp-2m", make_grid(teacher.schedule, 16).tolist(), {}), shape)
    assert reference["class_accuracy"] >= 0.8, reference  # the teacher itself draws the requested digits

    student_dir = str(tmp_path / "sfd")
    train("objective=sfd", "objective.nfe=2", "teacher=checkpoint", f"teacher.path={teacher_dir}", "data=digits",
          *QUIET, f"out={student_dir}")
    student_nets, spec, _ = load_run(student_dir)
    student = _report(student_nets.student, spec, shape)
    assert student["fid"] * 2 <= min(teacher_fid.values()), (student, teacher_fid)
    assert student["class_accuracy"] >= 0.8, student
