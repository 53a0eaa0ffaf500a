"""Built-ins that report a run: ``metrics.jsonl`` (and TensorBoard when installed), and the progress bar."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import fsspec
from tqdm import tqdm

from core import files, hookimpl


class MetricsLog:
    """One JSON record per log step in ``RUN/metrics.jsonl``; scalars also to ``RUN/tb`` (local runs)."""

    def __init__(self, out: str):
        self.url = files.join(out, "metrics.jsonl")
        self.tb = None
        local = fsspec.core.url_to_fs(out)[1] == out
        if local and os.environ.get("FEWSTEP_TENSORBOARD", "1") != "0":
            with contextlib.suppress(Exception):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out, "tb"))

    @hookimpl
    def fewstep_run_start(self, trainer, start):
        """A resumed run drops the records written after its checkpoint (all of them when it had none yet,
        and a half-written last line), so each step is logged once."""
        if not files.exists(self.url):
            return
        with fsspec.open(self.url, "r") as f:
            keep = [line for line in f if _logged_step(line) <= start]
        files.write_bytes_atomic(self.url, "".join(keep).encode())

    @hookimpl
    def fewstep_log(self, trainer, record):
        with fsspec.open(self.url, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    @hookimpl
    def fewstep_run_end(self, trainer, result):
        if self.tb is not None:
            self.tb.close()


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; a half-written line (killed mid-write) counts as never logged."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


class ProgressBar:
    """tqdm on stderr (``train.progress``) with the latest losses."""

    def __init__(self, cfg, start: int):
        self.bar = tqdm(total=cfg.train.steps, initial=start, disable=not cfg.train.progress, dynamic_ncols=True,
                        file=sys.stderr, desc=f"{cfg.objective.name}/{cfg.teacher.name}")

    @hookimpl
    def fewstep_iteration_end(self, trainer, step):
        self.bar.update(1)

    @hookimpl
    def fewstep_log(self, trainer, record):
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in record.items()
                              if k not in ("step", "time") and isinstance(v, float)}, refresh=False)

    @hookimpl
    def fewstep_run_end(self, trainer, result):
        self.bar.close()

