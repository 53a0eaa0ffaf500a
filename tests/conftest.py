"""Shared fixtures. Tests use the installed entry points (built-ins register like third-party plugins)."""

from __future__ import annotations

import os

# Triton kernels run on CPU through the interpreter; it must be chosen before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

os.environ.setdefault("FEWSTEP_TENSORBOARD", "0")
# pytest -n 2 on 2 cores: one intra-op thread per worker (2 threads each oversubscribe and run ~50x slower
# on the small matmuls these tests use)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_config(*overrides: str):
    """A RunConfig from CLI-style overrides (progress bar off)."""
    from core.config import parse_overrides
    from core.runconfig import resolve

    return resolve(parse_overrides(["train.progress=false", *overrides]))


def train(*overrides: str) -> dict:
    """Train a run in-process; returns the Trainer's result dict plus the trainer itself."""
    from core.runner import Trainer

    trainer = Trainer(run_config(*overrides))
    result = trainer.train()
    result["trainer"] = trainer
    return result


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run several times faster on one intra-op thread than contending for the shared cores
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ring8_teacher_run(tmp_path_factory):
    """A small MLP teacher trained with objective=denoise on ring8 (network teacher for SFD/MM/DMD2).

    Served afterwards by ``teacher=checkpoint teacher.path=<this dir>``."""
    out = tmp_path_factory.mktemp("ring8-teacher") / "run"
    train("objective=denoise", "teacher=gmm", "teacher.preset=ring8", "train.steps=1500", "train.batch=512",
          "train.eval_every=0", "train.preview_every=0", f"out={out}", "seed=0")
    return str(out)


@pytest.fixture(scope="module")
def digits_classifier_cache(tmp_path_factory):
    """A fresh FEWSTEP_CACHE for the digits FID classifier: a module trains its own and never touches ~/.cache."""
    from plugins.digits import fid

    old = os.environ.get("FEWSTEP_CACHE")
    os.environ["FEWSTEP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    fid._CLASSIFIER = None
    yield
    fid._CLASSIFIER = None
    if old is None:
        os.environ.pop("FEWSTEP_CACHE")
    else:
        os.environ["FEWSTEP_CACHE"] = old
