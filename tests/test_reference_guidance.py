"""Classifier-free guidance of the network teachers against separate conditional and unconditional calls.

CFG (Ho & Salimans 2022) in x0 space: x0_guided = x0_u + w (x0_c - x0_u), where x0_c = D(x_t, t, c) and
x0_u = D(x_t, t, null) are two independent calls of the same network (null = label -1 for the MLP nets).
The expectation here is built from those two plain calls, never from the code path under test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import train

from core.registry import get_registry

TINY_RUN = ("objective=denoise", "teacher=gmm", "teacher.preset=cls4", "student.hidden=32", "student.depth=2",
            "student.emb_dim=16", "train.steps=3", "train.batch=32", "train.eval_every=0", "train.preview_every=0",
            "train.log_every=1", "seed=0")


@pytest.fixture(scope="module")
def checkpoint_teacher(tmp_path_factory):
    """A class-conditional network teacher (cls4, 4 classes) served by ``teacher=checkpoint``, built through the
    registry like any run does. Three training steps are enough: the label embeddings are random, so the
    conditional and unconditional outputs already differ everywhere."""
    out = tmp_path_factory.mktemp("cfg-teacher") / "run"
    train(*TINY_RUN, f"out={out}")
    info = get_registry().get("teacher", "checkpoint")
    return info.factory(info.config(path=str(out), guidance=1.0))


def _inputs(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_t = 1.5 * torch.randn(n, 2, generator=g)
    t = torch.exp(torch.empty(n).uniform_(-4, 3, generator=g))  # EDM sigmas from 0.02 to 20
    cond = torch.randint(0, 4, (n,), generator=g)
    return x_t, t, cond


def _separate_calls(net, x_t, t, cond):
    """x0_c and x0_u as two plain float64-compared calls of the served network."""
    with torch.no_grad():
        x_c = net.denoise(x_t, t, cond).double()
        x_u = net.denoise(x_t, t, torch.full_like(cond, -1)).double()
    return x_c, x_u


@pytest.mark.parametrize("w", [0.0, 2.5, 7.0])
def test_network_teacher_cfg_is_uncond_plus_w_times_difference(checkpoint_teacher, w):
    teacher = checkpoint_teacher
    x_t, t, cond = _inputs()
    x_c, x_u = _separate_calls(teacher.net, x_t, t, cond)
    assert (x_c - x_u).abs().min() > 1e-4  # the two calls differ, so the formula is observable
    got = teacher.denoise(x_t, t, cond, guidance=w).double()
    torch.testing.assert_close(got, x_u + w * (x_c - x_u), rtol=1e-5, atol=1e-5)


def test_network_teacher_cfg_special_cases(checkpoint_teacher):
    """No guidance (None or 1) is the conditional model; cond=None is the unconditional one at any scale;
    w = 0 is the unconditional model."""
    teacher = checkpoint_teacher
    x_t, t, cond = _inputs(seed=2)
    x_c, x_u = _separate_calls(teacher.net, x_t, t, cond)
    for w in (None, 1.0):
        torch.testing.assert_close(teacher.denoise(x_t, t, cond, guidance=w).double(), x_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher.denoise(x_t, t, cond, guidance=0.0).double(), x_u, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        uncond = teacher.net.denoise(x_t, t, None).double()
    torch.testing.assert_close(uncond, x_u, rtol=0, atol=0)  # cond=None is label -1
    torch.testing.assert_close(teacher.denoise(x_t, t, None, guidance=4.0).double(), x_u, rtol=1e-5, atol=1e-5)


def test_network_teacher_cfg_with_a_scalar_time(checkpoint_teacher):
    """Samplers may pass one time for the whole batch; guidance must pair each row with its own null row."""
    teacher = checkpoint_teacher
    x_t, _, cond = _inputs(seed=3)
    t = torch.full((x_t.shape[0],), 0.7)
    x_c, x_u = _separate_calls(teacher.net, x_t, t, cond)
    got = teacher.denoise(x_t, torch.tensor(0.7), cond, guidance=3.0).double()
    torch.testing.assert_close(got, x_u + 3.0 * (x_c - x_u), rtol=1e-5, atol=1e-5)


def test_exact_teacher_cfg_is_uncond_plus_w_times_difference():
    """The exact mixture teacher's CFG by the same rule: from its own class-conditional and unconditional means."""
    info = get_registry().get("teacher", "gmm")
    teacher = info.factory(info.config(preset="cls4"))
    x_t, t, cond = _inputs(seed=4)
    x_t, t = x_t.double(), t.double()
    x_c = teacher.denoise(x_t, t, cond)
    x_u = teacher.denoise(x_t, t, None)
    assert (x_c - x_u).abs().max() > 1e-2
    torch.testing.assert_close(teacher.denoise(x_t, t, cond, guidance=3.0), x_u + 3.0 * (x_c - x_u))
