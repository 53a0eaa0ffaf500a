"""Digits FID: Fréchet distance in the feature space of a small classifier trained on the held-out split.

The classifier (two 3x3 convolutions, a 64-unit feature layer, 10 logits) sees 8x8 images; 16/32-pixel
samples are area-averaged down to 8x8 first, so every ``data.size`` is scored by the same network. It is
trained deterministically (seeded init and batches, one thread, ``STEPS`` Adam steps with +-1 pixel
shifts) on the 300 held-out digits, which no teacher trains on, and cached as safetensors at
``$FEWSTEP_CACHE/digits-classifier-v1.safetensors`` (default ``~/.cache/fewstep``); delete the file to
retrain. The reference statistics are those of the 1,497 train digits at the samples' size (pooled back to
8x8 the same way).

    FID = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))             (Heusel et al. 2017)

``digits_report`` adds the classifier's accuracy on class-conditional samples (label c comes out as c)
and the share of each predicted class (coverage; the minimum is reported); ``class_spread`` measures the
variety within each class against the train split's (collapse to one image per class reads near 0).

    python -m plugins.digits.fid SAMPLES.npz    # a core.sample .npz: FID, class accuracy, class shares
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .data import NUM_CLASSES, load_split

VERSION = 1
STEPS = 400
FEATURES = 64


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.feature = nn.Sequential(nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Images [N, 1, H, W] in [-1, 1] (H = W = 8, 16 or 32) -> [N, FEATURES]."""
        x = x.float().clamp(-1, 1)
        if x.shape[-1] != 8:
            x = F.adaptive_avg_pool2d(x, 8)
        return self.feature(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def cache_path() -> str:
    root = os.environ.get("FEWSTEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fewstep")
    return os.path.join(root, f"digits-classifier-v{VERSION}.safetensors")


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Each image moved by up to one pixel in each direction (zero = background -1 padding)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(x.shape[0])])


def train_classifier() -> DigitClassifier:
    """The classifier, trained from scratch on the held-out split; same weights on every run of a build."""
    x, y = load_split("held-out", 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in a fixed order
    try:
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(VERSION)
            net = DigitClassifier()
            gen = torch.Generator().manual_seed(VERSION)
            opt = torch.optim.Adam(net.parameters(), lr=2e-3)
            for _ in range(STEPS):
                idx = torch.randint(0, len(y), (128,), generator=gen)
                loss = F.cross_entropy(net(_shift(x[idx], gen)), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


_CLASSIFIER: DigitClassifier | None = None


def classifier() -> DigitClassifier:
    """The cached classifier (trained and saved on first use)."""
    global _CLASSIFIER
    if _CLASSIFIER is not None:
        return _CLASSIFIER
    from safetensors.torch import load_file, save_file

    path = cache_path()
    net = DigitClassifier().eval().requires_grad_(False)
    if os.path.exists(path):
        net.load_state_dict(load_file(path))
    else:
        net = train_classifier()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
        os.replace(tmp, path)  # concurrent first uses write the same bytes; the last rename wins
    _CLASSIFIER = net
    return net


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature rows a [N, D] and b [M, D] (float64).

    Tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues) of S_a^(1/2) S_b S_a^(1/2), which is symmetric PSD, so
    only symmetric eigendecompositions are needed."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def features(x: Tensor, batch: int = 1024) -> Tensor:
    net = classifier()
    return torch.cat([net.features(x[i:i + batch].cpu()) for i in range(0, len(x), batch)])


_REFERENCE: dict[int, Tensor] = {}


def reference_features(size: int) -> Tensor:
    """Features of the train split at ``size`` (upsampled, then pooled back like the samples are)."""
    if size not in _REFERENCE:
        _REFERENCE[size] = features(load_split("train", size)[0])
    return _REFERENCE[size]


def within_class_distance(x: Tensor, labels: Tensor) -> Tensor:
    """Per class c, the mean pixel-space L2 distance between two different images labelled c ([NUM_CLASSES],
    float64; NaN for a class with fewer than 2 images)."""
    x, labels = x.flatten(1).double().cpu(), labels.cpu().long()
    out = torch.full((NUM_CLASSES,), float("nan"), dtype=torch.float64)
    for c in range(NUM_CLASSES):
        xc = x[labels == c]
        if len(xc) > 1:
            out[c] = torch.cdist(xc, xc).sum() / (len(xc) * (len(xc) - 1))
    return out


def class_spread(samples: Tensor, labels: Tensor) -> float:
    """Variety within a class: the mean over classes of ``within_class_distance`` of the samples divided by
    that of the train split at the same size. About 1 for real variety; near 0 when a generator draws one
    image per label whatever its noise (a collapse that FID sees only indirectly and accuracy not at all)."""
    train_x, train_y = load_split("train", samples.shape[-1])
    return float((within_class_distance(samples, labels) / within_class_distance(train_x, train_y)).nanmean())


@torch.no_grad()
def digits_report(samples: Tensor, labels: Tensor | None = None) -> dict:
    """FID against the train split; with the labels the samples were asked for, class accuracy and class
    spread; and the predicted-class shares (min and per class)."""
    feats = features(samples)
    pred = classifier().head(feats).argmax(1)
    share = torch.bincount(pred, minlength=NUM_CLASSES).double() / len(pred)
    out = {"fid": frechet_distance(feats, reference_features(samples.shape[-1])), "min_class_share": float(share.min()),
           "class_share": [round(float(s), 4) for s in share]}
    if labels is not None:
        out["class_accuracy"] = float((pred == labels.cpu().long()).double().mean())
        out["class_spread"] = class_spread(samples, labels)
    return out


def floor_report(size: int = 8) -> dict:
    """The held-out real digits scored like samples: the FID floor of this metric; ``train_split_accuracy``
    is the classifier's accuracy on digits it never saw."""
    held_x, held_y = load_split("held-out", size)
    train_x, train_y = load_split("train", size)
    report = digits_report(held_x, held_y)
    report["train_split_accuracy"] = float((classifier()(train_x).argmax(1) == train_y).double().mean())
    return report


def report_npz(path: str) -> dict:
    """``digits_report`` of a ``core.sample`` .npz (``samples`` [N, 1, H, W] in [-1, 1], optional ``labels``)."""
    import numpy as np

    from core.errors import UsageError

    try:
        data = np.load(path, allow_pickle=False)  # never unpickle a samples file
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read samples ({exc})") from None
    if "samples" not in data:
        raise UsageError(f"{path} holds no 'samples' array; write one with python -m core.sample ... out={path}")
    x = torch.as_tensor(data["samples"])
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] not in (8, 16, 32) or x.shape[-2] != x.shape[-1]:
        raise UsageError(f"{path}: the digits FID needs images of shape (N, 1, S, S) with S in 8, 16, 32, "
                         f"got {tuple(x.shape)}")
    labels = torch.as_tensor(data["labels"]) if "labels" in data else None
    return digits_report(x, labels)


def format_report(report: dict) -> str:
    parts = [f"digits_fid={report['fid']:.4f}"]
    if "class_accuracy" in report:
        parts.append(f"class_accuracy={report['class_accuracy']:.4f} class_spread={report['class_spread']:.4f}")
    parts.append(f"min_class_share={report['min_class_share']:.4f}")
    return " ".join(parts) + " class_share=" + ",".join(f"{s:.3f}" for s in report["class_share"])


def main(argv: list[str]) -> int:
    """``python -m plugins.digits.fid SAMPLES.npz``: the digits FID, class accuracy and class shares."""
    from core.errors import ConfigError

    usage = "usage: python -m plugins.digits.fid SAMPLES.npz (written by python -m core.sample)"
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        raise ConfigError(usage)
    print(format_report(report_npz(argv[0])))
    return 0


if __name__ == "__main__":
    from core.cli import guard

    sys.exit(guard(main)())
