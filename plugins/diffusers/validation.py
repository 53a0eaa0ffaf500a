"""Callback ``validation``: fixed validation prompts x fixed seeds, sampled from the student with its own sampler
every ``train.preview_every`` steps and at the end, into ``RUN/previews/step-XXXXXX.png`` (one row per prompt,
one column per seed; every grid is kept) and, where TensorBoard is installed, ``RUN/tb`` as image ``validation``.

    python -m core.run ... callbacks=[validation] train.validation_prompts=val.txt train.validation_seeds=4

``train.validation_prompts`` is a list of prompts or one path that ``data=prompts`` could read. Column j of every
grid uses seed ``train.seed + j`` (in its own RNG stream, so training stays reproducible), so grids of different
steps show the same noise and differ only by the student's progress.
"""

from __future__ import annotations

import contextlib
import io
import os

import torch

from core import files, hookimpl
from core.errors import UsageError


def read_validation_prompts(value) -> list[str]:
    from plugins.diffusers.data import read_prompts

    if not value:
        raise UsageError("callbacks=[validation] needs train.validation_prompts=[...] or a prompt file")
    if isinstance(value, str):
        return read_prompts(value)
    return [str(p) for p in value]


def grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows * cols, 3, H, W] ordered row-major -> one [3, rows H, cols W] image."""
    n, c, h, w = images.shape
    cols = n // rows
    return images.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


@torch.no_grad()
def validation_images(trainer, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Images in [-1, 1], [len(prompts) * len(seeds), 3, H, W], prompt-major."""
    from core.generation import generate

    teacher, device = trainer.teacher, trainer.device
    columns = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            cond = teacher.encode_condition(prompts)
            z = generate(trainer.sampling_model(), trainer.spec, len(prompts), cond, trainer.registry, device,
                         batch=8, shape=teacher.data_shape)
            columns.append(teacher.to_data_space(z).float().cpu())
    return torch.stack(columns, dim=1).flatten(0, 1)


class ValidationGrids:
    """See the module docstring. Runs on rank 0 after the built-in preview gathered the weights."""

    def __init__(self, config=None):
        self.prompts: list[str] = []
        self.seeds: list[int] = []
        self.tb = None
        self.done: set[int] = set()

    @hookimpl
    def fewstep_run_start(self, trainer, start):
        tr = trainer.cfg.train
        if not hasattr(trainer.teacher, "bank"):
            raise UsageError("callbacks=[validation] samples prompts; it needs a text-to-image (diffusers) teacher")
        self.prompts = read_validation_prompts(tr.validation_prompts)
        self.seeds = [trainer.cfg.seed + j for j in range(tr.validation_seeds)]
        local = files.url_to_fs(trainer.out)[1] == trainer.out
        if local and os.environ.get("FEWSTEP_TENSORBOARD", "1") != "0":
            with contextlib.suppress(Exception):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(trainer.out, "tb"))

    def write(self, trainer, step: int) -> str:
        from PIL import Image

        image = grid(validation_images(trainer, self.prompts, self.seeds), len(self.prompts))
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        folder = files.join(trainer.out, "previews")
        fs, path = files.url_to_fs(folder)
        fs.makedirs(path, exist_ok=True)
        url = files.join(folder, f"step-{step:06d}.png")
        files.write_bytes_atomic(url, buf.getvalue())
        if self.tb is not None:
            self.tb.add_image("validation", pixels, step)
            self.tb.flush()
        self.done.add(step)
        return url

    @hookimpl(trylast=True)
    def fewstep_iteration_end(self, trainer, step):
        every = trainer.cfg.train.preview_every
        if every and step % every == 0 and step != trainer.cfg.train.steps:
            self.write(trainer, step)

    @hookimpl(trylast=True)
    def fewstep_run_end(self, trainer, result):
        step = trainer.cfg.train.steps
        if step not in self.done:
            result["validation"] = self.write(trainer, step)
        if self.tb is not None:
            self.tb.close()
