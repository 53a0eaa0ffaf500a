"""Real images: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes) as ``data=digits``.

The images ship inside scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded. Pixels
0..16 map to [-1, 1]; ``data.size`` 16 or 32 upsamples bilinearly. The split is fixed: per class, a
permutation seeded with ``SPLIT_SEED`` puts the first ``HELD_OUT_PER_CLASS`` images in the held-out split
(300 images: the FID classifier's data and the real reference) and the rest (1,497) in the train split,
the only images a teacher ever sees.

``teacher=digits`` describes that data to a run (shape, 10 classes, EDM schedule) and denoises exactly
for the empirical distribution of the train split (a memoriser: the closed-form E[x0 | x_t] of N deltas).
It is what ``objective=denoise data=digits student=unet`` trains a network teacher against.
"""

from __future__ import annotations

import functools
import math

import attrs
import torch
from torch import Tensor
from torch.nn import functional as F

from core.config import FieldError, positive
from core.errors import UsageError
from core.schedules import make_schedule

SIZES = (8, 16, 32)
NUM_CLASSES = 10
SPLIT_SEED = 0
HELD_OUT_PER_CLASS = 30


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[Tensor, Tensor]:
    """All 1,797 images as [N, 1, 8, 8] floats in [-1, 1] and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("data=digits needs scikit-learn; install it with: pip install 'fewstep[digits]'") from None
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8 - 1
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


def split_indices(split: str) -> Tensor:
    """Indices into ``load_digits()`` of the ``train`` or ``held-out`` split (fixed, seeded, per class)."""
    _, labels = _raw()
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    held, train = [], []
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held.append(idx[:HELD_OUT_PER_CLASS])
        train.append(idx[HELD_OUT_PER_CLASS:])
    if split not in ("train", "held-out"):
        raise ValueError(f"split must be 'train' or 'held-out', got {split!r}")
    return torch.cat(train if split == "train" else held).sort().values


def load_split(split: str, size: int = 8) -> tuple[Tensor, Tensor]:
    """(images [N, 1, size, size] in [-1, 1], labels [N]) of one split."""
    if size not in SIZES:
        raise UsageError(f"digits size must be one of {', '.join(map(str, SIZES))}, got {size}")
    images, labels = _raw()
    idx = split_indices(split)
    x = images[idx]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x, labels[idx]


def check_labels(labels) -> Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long)
    bad = labels[(labels < -1) | (labels >= NUM_CLASSES)]
    if len(bad):
        raise UsageError(f"digit labels are 0-9 (or -1 for unconditional), got {int(bad[0])}; use label=0..9")
    return labels


# ------------------------------------------------------------------------------------------------
# data=digits

def _size(instance, attribute, value):
    if value not in SIZES:
        raise FieldError(attribute.name, f"must be one of {', '.join(map(str, SIZES))} (the image side), got {value}")


@attrs.define(kw_only=True)
class DigitsDataConfig:
    size: int = attrs.field(default=8, validator=_size,
                            metadata={"doc": "image side: 8 (native) or 16/32 (bilinear upsampling)"})


class DigitsData:
    """Train-split digits with their class labels; random rows from torch's global RNG."""

    def __init__(self, config: DigitsDataConfig, teacher):
        self.config = config
        self.images, self.labels = load_split("train", config.size)
        shape = (1, config.size, config.size)
        if isinstance(teacher, DigitsTeacher):
            teacher.bind(self.images, self.labels)
        elif tuple(teacher.data_shape) != shape:
            raise UsageError(f"data=digits data.size={config.size} gives images of shape {shape}, but the teacher's "
                             f"data has shape {tuple(teacher.data_shape)}; pass data.size={teacher.data_shape[-1]}"
                             if len(teacher.data_shape) == 3 else
                             f"data=digits gives images {shape}; teacher={type(teacher).__name__} has vector data "
                             f"{tuple(teacher.data_shape)} (use teacher=digits or a checkpoint of a digits run)")
        elif getattr(teacher, "num_classes", 0) not in (0, NUM_CLASSES):
            raise UsageError(f"data=digits has {NUM_CLASSES} classes; the teacher has {teacher.num_classes}")

    def sample(self, n: int) -> dict:
        idx = torch.randint(0, len(self.labels), (n,))
        return {"x": self.images[idx], "cond": self.labels[idx]}


# ------------------------------------------------------------------------------------------------
# teacher=digits: the exact denoiser of the train split's empirical distribution

@attrs.define(kw_only=True)
class DigitsTeacherConfig:
    sigma_min: float = attrs.field(default=0.002, validator=positive)
    sigma_max: float = attrs.field(default=80.0, validator=positive)
    guidance: float = attrs.field(default=1.0, metadata={"doc": "default CFG scale"})


class DigitsTeacher:
    """The train split as a teacher: exact E[x0 | x_t] of its empirical distribution (EDM schedule).

    For deltas y_i: E[x0 | x_t] = sum_i softmax_i(-|x_t - alpha y_i|^2 / 2 sigma^2) y_i; a class condition
    keeps only that class's images. ``data=digits`` binds its images (and so ``data.size``) to it; unbound,
    it serves the native 8x8 train split.
    """

    num_classes = NUM_CLASSES
    preview_samples = 80  # training previews: 8 per class

    def __init__(self, config: DigitsTeacherConfig, device="cpu"):
        self.config, self.device = config, torch.device(device)
        self.schedule = make_schedule("edm", sigma_min=config.sigma_min, sigma_max=config.sigma_max)
        self.guidance = config.guidance
        self.images = self.labels = None

    def bind(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self._sigma_data = float(images.std())

    def _bound(self):
        if self.images is None:  # used without data=digits: the native 8x8 images
            self.bind(*load_split("train", 8))
        return self

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self._bound().images.shape[1:])

    @property
    def sigma_data(self) -> float:
        """Pixel std of the train split (EDM preconditioning of the networks trained on it)."""
        return self._bound()._sigma_data

    def encode_condition(self, raw):
        return None if raw is None else check_labels(raw).to(self.device)

    def to_model_space(self, x):
        return x

    def to_data_space(self, z):
        return z.clamp(-1, 1)  # pixel range; a sampler's last step can overshoot it slightly

    def trainable_copy(self):
        return None

    @torch.no_grad()
    def denoise(self, x_t: Tensor, t: Tensor, cond=None, guidance: float | None = None) -> Tensor:
        self._bound()
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        alpha, sigma = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
        x = x_t.to(torch.float64).flatten(1)
        y = self.images.to(torch.float64).flatten(1)
        logits = -torch.cdist(x / alpha, y).square() * (alpha / sigma).square() / 2  # [B, N]

        def mean(labels):
            masked = logits if labels is None else logits.masked_fill(
                (labels[:, None] >= 0) & (self.labels[None] != labels[:, None]), -math.inf)
            return torch.softmax(masked, 1) @ y

        labels = None if cond is None else torch.as_tensor(cond, device=x.device).long()
        out = mean(labels)
        if labels is not None and guidance is not None and guidance != 1:
            out = mean(None) + guidance * (out - mean(None))
        return out.view_as(x_t).to(x_t.dtype)


DigitsData.conformance_config = {"teacher": "digits"}
