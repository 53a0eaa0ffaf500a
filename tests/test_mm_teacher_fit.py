"""Moment matching from scratch (an analytic teacher has no network to copy): the first iterations fit generator
and auxiliary to the teacher's x-prediction, the initialisation Algorithm 2 prescribes (both start as copies of
the teacher). Checked against the weighted regression written out here."""

from __future__ import annotations

import pytest
import torch

from core.networks import DenoiserNet, ResidualMLP
from core.protocols import Context
from plugins.gmm import GaussianMixtureTeacher, GMMConfig
from plugins.moment_matching import MMConfig, MomentMatching


def small_net(teacher, seed):
    torch.manual_seed(seed)
    return DenoiserNet(ResidualMLP(2, 32, 1, 16, 0), teacher.schedule, "edm", teacher.sigma_data).double()


def test_from_scratch_defaults_fit_first_and_raise_the_lr():
    analytic = GaussianMixtureTeacher(GMMConfig(preset="ring8"))

    class NetworkTeacher:  # a checkpoint or diffusers teacher: G and g_phi start as copies of its network
        schedule = analytic.schedule

    for teacher, fit, lr in ((analytic, 600, 1e-3), (NetworkTeacher(), 0, 1e-4)):
        obj = MomentMatching(MMConfig())
        obj.build({"teacher": teacher})
        assert obj.fit_iterations == fit and [p.lr for p in obj.phases()] == [5 * lr, lr]  # auxiliary, generator
    obj = MomentMatching(MMConfig(teacher_fit=10, lr=2e-4, aux_lr=5e-4))
    obj.build({"teacher": analytic})
    assert obj.fit_iterations == 10 and [p.lr for p in obj.phases()] == [5e-4, 2e-4]


@pytest.mark.parametrize("phase", ["auxiliary", "generator"])
def test_fit_iterations_regress_the_phases_network_onto_the_teacher(phase):
    teacher = GaussianMixtureTeacher(GMMConfig(preset="ring8"))
    student, aux = small_net(teacher, 1), small_net(teacher, 2)
    obj = MomentMatching(MMConfig(teacher_fit=5))
    obj.build({"teacher": teacher})
    x = teacher.sample_exact(64).double()
    nets = {"teacher": teacher, "student": student, "critic": aux}
    torch.manual_seed(4)
    loss, metrics = obj.loss(phase, Context(nets, {"x": x, "cond": None}, 4, 64, "cpu"))
    loss.backward()
    trained, other = (aux, student) if phase == "auxiliary" else (student, aux)
    assert all(p.grad is None for p in other.parameters()) and any(p.grad is not None for p in trained.parameters())
    torch.manual_seed(4)  # the same draws, written out: t over the whole range, z_t = x + sigma eps (EDM)
    u = torch.rand(64, dtype=torch.float64)
    t = teacher.schedule.t_from_fraction(u)
    z = x + t[:, None] * torch.randn_like(x)
    sd = teacher.sigma_data
    w = (t**2 + sd**2) / (t * sd) ** 2
    with torch.no_grad():
        want = (w * ((trained.denoise(z, t) - teacher.denoise(z, t)) ** 2).mean(1)).mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-9, atol=0)
    assert "teacher_fit" in metrics
    # after the fit iterations the phase is Algorithm 2's again
    loss, metrics = obj.loss(phase, Context(nets, {"x": x, "cond": None}, 5, 64, "cpu"))
    assert "teacher_fit" not in metrics
