"""Small networks and the denoiser wrapper (EDM's preconditioning, generalised to any schedule).

``DenoiserNet`` turns a raw backbone F into the framework's convention ``denoise(x_t, t, cond) -> x0``.
The wrapper computes in float32 or wider even when the backbone runs in lower precision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.parameterization import precondition, to_x0
from core.schedules import NoiseSchedule


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (the noise level), as in EDM's SongUNet."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c: Tensor) -> Tensor:
        angle = 2 * math.pi * c.float()[:, None] * self.freqs[None]
        return torch.cat([angle.cos(), angle.sin()], dim=1)


class FourierInput(nn.Module):
    """[x, cos 2 pi B x, sin 2 pi B x] with B ~ N(0, scale^2) of shape (features/2, dim): random Fourier features
    of the input (Tancik et al. 2020), which let a small MLP fit maps with sharp, low-dimensional structure.
    B is a buffer, so it is saved with the weights."""

    def __init__(self, dim: int, features: int, scale: float):
        super().__init__()
        self.register_buffer("freqs", torch.randn(features // 2, dim) * scale)

    @property
    def out_features(self) -> int:
        return self.freqs.shape[1] + 2 * self.freqs.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        angle = 2 * math.pi * x @ self.freqs.to(x.dtype).T
        return torch.cat([x, angle.cos(), angle.sin()], dim=1)


class ResidualMLP(nn.Module):
    """MLP backbone for vector data: F(x, c_noise, class) with additive time/class/extra embeddings.

    ``num_classes > 0`` adds a class embedding with one extra "null" row (label -1) for CFG dropout.
    ``fourier_features > 0`` feeds the input through ``FourierInput`` (that many cos/sin features, frequencies
    of std ``fourier_scale`` per unit of the preconditioned input) before the first layer.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, emb_dim: int = 128, num_classes: int = 0,
                 fourier_features: int = 0, fourier_scale: float = 1.0):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.time = nn.Sequential(FourierEmbedding(emb_dim), nn.Linear(emb_dim, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden))
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.fourier = FourierInput(dim, fourier_features, fourier_scale) if fourier_features else None
        self.inp = nn.Linear(self.fourier.out_features if self.fourier else dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                          nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def embed(self, c_noise: Tensor, cond: Tensor | None) -> Tensor:
        emb = self.time(c_noise)
        if self.label is not None:
            labels = torch.full((c_noise.shape[0],), -1, dtype=torch.long, device=c_noise.device) \
                if cond is None else cond.long()
            emb = emb + self.label(torch.where(labels < 0, self.num_classes, labels))
        return emb

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, extra_emb: Tensor | None = None):
        emb = self.embed(c_noise, cond)
        if extra_emb is not None:
            emb = emb + extra_emb
        x_in = x.flatten(1) if self.fourier is None else self.fourier(x.flatten(1))
        h = self.inp(x_in) + emb
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h).view_as(x)


class DenoiserNet(nn.Module):
    """``denoise(x_t, t, cond) -> x0`` around a backbone ``F(x_in, c_noise, cond)``.

    prediction='edm': D = c_skip x_t + c_out F(c_in x_t, c_noise) with the generalised EDM coefficients;
    otherwise F's output is read as eps / v / x0 / flow velocity and converted.
    c_noise = -logSNR/8, which is EDM's ln(sigma)/4 on the EDM schedule.
    """

    def __init__(self, backbone: nn.Module, schedule: NoiseSchedule, prediction: str = "edm",
                 sigma_data: float = 0.5):
        super().__init__()
        self.backbone, self.schedule, self.prediction, self.sigma_data = backbone, schedule, prediction, sigma_data

    def forward(self, x_t: Tensor, t: Tensor, cond=None, **kwargs) -> Tensor:
        return self.denoise(x_t, t, cond, **kwargs)

    def denoise(self, x_t: Tensor, t: Tensor, cond=None, **kwargs) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x = x_t.to(dtype)
        alpha, sigma = self.schedule.alpha(t).to(dtype), self.schedule.sigma(t).to(dtype)
        c_noise = -self.schedule.logsnr(t).to(dtype) / 8
        if self.prediction == "edm":
            c_in, c_skip, c_out = precondition(alpha, sigma, self.sigma_data, x)
            out = self.backbone(c_in * x, c_noise, cond, **kwargs).to(dtype)
            return (c_skip * x + c_out * out).to(x_t.dtype)
        out = self.backbone(x, c_noise, cond, **kwargs).to(dtype)
        return to_x0(out, x, alpha, sigma, self.prediction).to(x_t.dtype)


def guided(denoiser, x_t: Tensor, t: Tensor, cond, guidance: float | None):
    """Classifier-free guidance for a network denoiser whose null condition is label -1."""
    if guidance is None or guidance == 1 or cond is None:
        return denoiser.denoise(x_t, t, cond)
    null = torch.full_like(cond, -1)
    both = denoiser.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]) if torch.as_tensor(t).ndim else t,
                            torch.cat([cond, null]))
    x_c, x_u = both.chunk(2)
    return x_u + guidance * (x_c - x_u)
