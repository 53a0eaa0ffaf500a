"""Critic ``fake-score``: a trainable denoiser of the generator's distribution (DMD2's fake score,
moment matching's auxiliary). Initialised from the teacher's network when it has one, otherwise a
copy of the student's architecture with fresh weights."""

from __future__ import annotations

import copy

import attrs
import torch

from core import hookimpl


@attrs.define(kw_only=True)
class FakeScoreConfig:
    init: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "teacher", "student", "fresh")),
                            metadata={"doc": "auto: teacher's network if any, else a fresh student-architecture net"})


def _reset(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


def fake_score(config: FakeScoreConfig, teacher, student, device="cpu"):
    """Trainable denoiser of generated samples (teacher copy, else the student's architecture)."""
    net = teacher.trainable_copy() if config.init in ("auto", "teacher") else None
    if net is None:
        net = copy.deepcopy(student)
        if config.init in ("auto", "fresh"):
            _reset(net)
    return net.requires_grad_(True).train().to(device)


@hookimpl
def register_critics(register):
    register("fake-score", fake_score, config=FakeScoreConfig)
