"""Exact Gaussian-mixture teacher and dataset: closed-form E[x0 | x_t] on any schedule.

For x0 ~ sum_k w_k N(mu_k, diag s_k^2) and x_t = alpha x0 + sigma eps:
    x_t | k ~ N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)),
    E[x0 | x_t, k] = mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) * (x_t - alpha mu_k),
and E[x0 | x_t] mixes these with responsibilities from log-sum-exp. Class-conditional denoising keeps
only the class's components, and CFG combines the exact conditional and unconditional means.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor

from core import hookimpl
from core.config import positive
from core.errors import UsageError
from core.schedules import make_schedule


def _ring(n, radius, std, dim=2):
    ang = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    return torch.stack([radius * ang.cos(), radius * ang.sin()], 1), torch.full((n, dim), std, dtype=torch.float64)


def preset(name: str) -> dict:
    """The built-in mixtures. Deterministic: random parts use a fixed generator."""
    if name == "ring8":
        means, stds = _ring(8, 1.0, 0.08)
        return {"weights": torch.full((8,), 1 / 8, dtype=torch.float64), "means": means, "stds": stds}
    if name == "grid25":
        g = torch.linspace(-1, 1, 5, dtype=torch.float64)
        means = torch.cartesian_prod(g, g)
        w = torch.arange(1, 26, dtype=torch.float64)[torch.randperm(25, generator=torch.Generator().manual_seed(0))]
        return {"weights": w / w.sum(), "means": means, "stds": torch.full((25, 2), 0.06, dtype=torch.float64)}
    if name == "hd16":
        gen = torch.Generator().manual_seed(16)
        w = torch.rand(10, generator=gen, dtype=torch.float64) + 0.3
        return {"weights": w / w.sum(), "means": torch.randn(10, 16, generator=gen, dtype=torch.float64),
                "stds": 0.05 + 0.25 * torch.rand(10, 16, generator=gen, dtype=torch.float64)}
    if name == "cls4":
        means, stds = _ring(8, 1.0, 0.08)
        return {"weights": torch.full((8,), 1 / 8, dtype=torch.float64), "means": means, "stds": stds,
                "classes": torch.arange(8) // 2}
    raise UsageError(f"unknown gmm preset '{name}'; choose one of: {', '.join(PRESETS)} (or teacher.spec=FILE.json)")


PRESETS = ("ring8", "grid25", "hd16", "cls4")


SPEC_FIX = 'it needs {"weights": [K], "means": [K x D], "stds": [K x D], "classes": [K] (optional)}'


def load_spec(path: str) -> dict:
    """A mixture from JSON, checked: finite numbers, stds > 0, weights >= 0 with a positive sum, K x D
    means and stds, and (optional) one non-negative integer class label per component."""
    from core.errors import CheckpointError, ConfigError
    from core.files import read_json

    where = f"teacher.spec={path}"
    try:
        raw = read_json(path, fix=SPEC_FIX)
    except CheckpointError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(raw, dict) or not all(k in raw for k in ("weights", "means", "stds")):
        have = ", ".join(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{where} lacks weights, means or stds (has: {have}); {SPEC_FIX}")
    spec = {}
    for key in ("weights", "means", "stds"):
        try:
            spec[key] = torch.as_tensor(raw[key], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(f"{where}: '{key}' is not a rectangular array of numbers; {SPEC_FIX}") from None
        if not torch.isfinite(spec[key]).all():
            raise ConfigError(f"{where}: '{key}' holds NaN or inf; every value must be finite")
    w, mu, sd = spec["weights"], spec["means"], spec["stds"]
    if w.ndim != 1 or w.numel() == 0 or mu.ndim != 2 or mu.shape[0] != w.shape[0] or sd.shape != mu.shape:
        raise ConfigError(f"{where}: need K weights and K x D means and stds, got shapes {tuple(w.shape)}, "
                          f"{tuple(mu.shape)}, {tuple(sd.shape)}")
    if (sd <= 0).any():
        raise ConfigError(f"{where}: every std must be > 0 (min is {float(sd.min())})")
    if (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"{where}: weights must be >= 0 with a positive sum, got {w.tolist()[:8]}")
    if "classes" in raw:
        labels = raw["classes"]
        if not (isinstance(labels, list) and len(labels) == len(w)
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in labels)):
            raise ConfigError(f"{where}: 'classes' must list one integer label >= 0 per component ({len(w)})")
        spec["classes"] = torch.as_tensor(labels, dtype=torch.long)
    spec["weights"] = w / w.sum()
    return spec


@attrs.define(kw_only=True)
class GMMConfig:
    preset: str = attrs.field(default="ring8", metadata={"doc": f"one of {', '.join(PRESETS)}"})
    spec: str | None = attrs.field(default=None, metadata={"doc": "JSON file {weights, means, stds, classes?}"})
    schedule: str = attrs.field(default="edm", metadata={"doc": "edm | vp-cosine | flow"})
    sigma_min: float = attrs.field(default=0.002, validator=positive)
    sigma_max: float = attrs.field(default=80.0, validator=positive)
    guidance: float = attrs.field(default=1.0, metadata={"doc": "default CFG scale for class-conditional sampling"})

    def __attrs_post_init__(self):
        if self.spec is None and self.preset not in PRESETS:
            preset(self.preset)  # raises the UsageError listing presets
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")


class GaussianMixtureTeacher:
    """Exact teacher: closed-form denoiser of a diagonal Gaussian mixture (float64 inside)."""

    analytic = True  # no network: students and critics start from scratch (objectives adapt their defaults)

    def __init__(self, config: GMMConfig, device="cpu"):
        spec = load_spec(config.spec) if config.spec else preset(config.preset)
        self.config = config
        self.device = torch.device(device)
        self.weights = spec["weights"].to(self.device)
        self.means = spec["means"].to(self.device)
        self.stds = spec["stds"].to(self.device)
        self.classes = spec.get("classes")
        if self.classes is not None:
            self.classes = self.classes.to(self.device)
        self.num_classes = 0 if self.classes is None else int(self.classes.max()) + 1
        self.data_shape = (self.means.shape[1],)
        if config.schedule == "edm":
            self.schedule = make_schedule("edm", sigma_min=config.sigma_min, sigma_max=config.sigma_max)
        else:
            self.schedule = make_schedule(config.schedule)
        self.guidance = config.guidance
        # exact data std (pooled over dims): mixture variance = E[s^2 + mu^2] - E[mu]^2
        mean = (self.weights[:, None] * self.means).sum(0)
        var = (self.weights[:, None] * (self.stds**2 + self.means**2)).sum(0) - mean**2
        self.sigma_data = float(var.mean().sqrt())

    # -- Teacher protocol ---------------------------------------------------------------------------
    def encode_condition(self, raw):
        return None if raw is None else torch.as_tensor(raw, dtype=torch.long, device=self.device)

    def to_model_space(self, x):
        return x

    def to_data_space(self, z):
        return z

    def trainable_copy(self):
        return None

    def _posterior(self, x_t: Tensor, t: Tensor, labels: Tensor | None):
        x = x_t.to(torch.float64).flatten(1)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        a = self.schedule.alpha(t.to(torch.float64))[:, None, None]  # [B,1,1]
        s = self.schedule.sigma(t.to(torch.float64))[:, None, None]
        var = a**2 * self.stds[None] ** 2 + s**2  # [B,K,D]
        diff = x[:, None, :] - a * self.means[None]
        logp = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1) + torch.log(self.weights)[None]
        if labels is not None and self.classes is not None:
            keep = (labels[:, None] < 0) | (self.classes[None, :] == labels[:, None])
            logp = logp.masked_fill(~keep, -math.inf)
        resp = torch.softmax(logp, dim=1)  # [B,K]
        cond_means = self.means[None] + a * self.stds[None] ** 2 / var * diff  # [B,K,D]
        return resp, cond_means

    def denoise(self, x_t: Tensor, t: Tensor, cond=None, guidance: float | None = None) -> Tensor:
        """E[x0 | x_t] (or | x_t, class), with exact classifier-free guidance when ``guidance`` != 1."""
        def mean(labels):
            resp, cm = self._posterior(x_t, t, labels)
            return (resp[..., None] * cm).sum(1)

        labels = None if cond is None else torch.as_tensor(cond, device=x_t.device).long()
        out = mean(labels)
        if labels is not None and guidance is not None and guidance != 1:
            out = mean(None) + guidance * (out - mean(None))
        return out.view_as(x_t).to(x_t.dtype)

    # -- exact data access (metrics, real data) -------------------------------------------------------
    def sample_exact(self, n: int, labels: Tensor | None = None, generator=None) -> Tensor:
        """Exact samples of the mixture (of one class per row when ``labels`` is given)."""
        w = self.weights.expand(n, -1) if labels is None else self.class_weights(labels)
        k = torch.multinomial(w, 1, generator=generator).squeeze(1)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64, device=self.device)
        return (self.means[k] + self.stds[k] * eps).float()

    def class_weights(self, labels: Tensor) -> Tensor:
        w = self.weights.expand(labels.shape[0], -1)
        return torch.where(self.classes[None] == labels[:, None], w, torch.zeros_like(w))

    def assign_modes(self, x: Tensor) -> Tensor:
        """Index of the most responsible component for each (clean) sample."""
        resp, _ = self._posterior(x, torch.full((x.shape[0],), self.schedule.t_min, dtype=torch.float64,
                                                device=x.device), None)
        return resp.argmax(1)


@attrs.define(kw_only=True)
class GMMDataConfig:
    class_probs: list[float] | None = attrs.field(default=None, metadata={"doc": "class frequencies (default: uniform)"})


class GaussianMixtureData:
    """Exact samples of the teacher's mixture, with their class labels when it is class-conditional."""

    def __init__(self, config: GMMDataConfig, teacher):
        if not isinstance(teacher, GaussianMixtureTeacher):
            raise UsageError("data=gmm needs teacher=gmm (it draws the teacher's exact mixture)")
        probs, k = config.class_probs, teacher.num_classes
        if probs is not None and (len(probs) != k or min(probs) < 0 or sum(probs) <= 0):
            need = f"{k} values >= 0 with a positive sum" if k else "none: this mixture has no classes"
            raise UsageError(f"data.class_probs={probs}: need {need}")
        self.teacher, self.config = teacher, config

    def sample(self, n: int) -> dict:
        t = self.teacher
        labels = None
        if t.num_classes:
            probs = torch.as_tensor(self.config.class_probs or [1.0] * t.num_classes, dtype=torch.float64)
            labels = torch.multinomial(probs.expand(n, -1), 1).squeeze(1).to(t.device)
        return {"x": t.sample_exact(n, labels), "cond": labels}


@hookimpl
def register_teachers(register):
    register("gmm", GaussianMixtureTeacher, config=GMMConfig, default_student="mlp", default_data="gmm")


@hookimpl
def register_datasets(register):
    register("gmm", GaussianMixtureData, config=GMMDataConfig)
