"""Student and critic: trainable modules with denoise, rebuilt from their state_dict by load_run."""

from __future__ import annotations

from typing import Callable

import torch

from ._report import Report, _close, fail
from ._setup import Setup
from .denoisers import _eval_mode, _noised, _storages, _teacher_modules, _times, check_denoiser


def _check_trainable_net(role: str, build: Callable, setup: Setup, others: dict) -> None:
    torch.manual_seed(0)
    net = setup.build(f"build the {role}", build)
    if not isinstance(net, torch.nn.Module):
        fail(f"the {role} factory returned {type(net).__name__}", "return a torch.nn.Module with denoise() and schedule")
    if not any(p.requires_grad for p in net.parameters()):
        fail(f"{role} has no parameter that requires grad", "return the network with trainable parameters")
    for other, module in others.items():
        if _storages(net) & _storages(module):
            fail(f"{role} shares parameter storage with the {other}", "copy the weights (copy.deepcopy) instead of sharing")
    t = setup.teacher
    x0, cond, _ = setup.batch(32)
    if x0 is None:
        x0 = torch.randn(32, *t.data_shape) * float(getattr(t, "sigma_data", 0.5))
    out = check_denoiser(role, net, t.data_shape, x0, cond)
    # a loss on the output must reach the parameters
    sched = net.schedule
    tv = _times(sched, x0.shape[0])
    net.zero_grad(set_to_none=True)
    net.denoise(_noised(sched, x0, tv), tv.float(), cond).square().mean().backward()
    if not any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters()):
        fail(f"no gradient reaches the {role}'s parameters from denoise()", "don't detach or run denoise under no_grad")
    net.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    again = build()
    again.load_state_dict(net.state_dict())
    x_t = _noised(sched, x0, tv)
    with torch.no_grad(), _eval_mode(net), _eval_mode(again):
        ok, diff = _close(again.denoise(x_t, tv.float(), cond), net.denoise(x_t, tv.float(), cond), 1e-5)
    if not ok:
        fail(f"a {role} rebuilt by its factory and loaded from the state_dict gives different outputs (max {diff:.3g})",
             "keep every tensor denoise() uses in parameters or registered buffers; load_run and "
             "teacher=checkpoint rebuild networks this way")
    del out


def check_student(setup: Setup, rep: Report) -> None:
    info, t = setup.info, setup.teacher
    config = setup.config_of("student")
    rep.run("student", _check_trainable_net, "student", lambda: info.factory(config, t, setup.device), setup,
            _teacher_modules(t))


def check_critic(setup: Setup, rep: Report) -> None:
    t, cfg = setup.teacher, setup.cfg
    sinfo = setup.registry.get("student", cfg.student.name)
    torch.manual_seed(0)
    student = setup.build("build a student", lambda: sinfo.factory(cfg.student.config, t, setup.device))
    config = setup.config_of("critic")
    rep.run("critic", _check_trainable_net, "critic", lambda: setup.info.factory(config, t, student, setup.device),
            setup, {"student": student, **_teacher_modules(t)})
