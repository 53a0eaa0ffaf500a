"""Preview pictures: a scatter plot for vector data (first two dims), an image grid for images."""

from __future__ import annotations

import io
import math

import torch
from PIL import Image, ImageDraw


def scatter_png(samples: torch.Tensor, reference: torch.Tensor | None = None, size: int = 512,
                title: str = "samples (red) vs exact data (grey)") -> bytes:
    pts = samples.detach().float().flatten(1)[:, :2].cpu()
    ref = None if reference is None else reference.detach().float().flatten(1)[:, :2].cpu()
    both = pts if ref is None else torch.cat([pts, ref])
    lo, hi = both.quantile(0.001, dim=0), both.quantile(0.999, dim=0)
    span = float((hi - lo).max()) * 1.1 + 1e-6
    center = (lo + hi) / 2
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def plot(p, color):
        uv = ((p - center) / span + 0.5) * size
        for u, v in uv.tolist():
            draw.ellipse((u - 1.5, size - v - 1.5, u + 1.5, size - v + 1.5), fill=color)

    if ref is not None:
        plot(ref, (170, 170, 170))
    plot(pts, (200, 30, 30))
    draw.text((8, 8), title if ref is not None else "samples", fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: torch.Tensor) -> bytes:
    """Images in [-1, 1], shape [N, C, H, W] (C = 1 or 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def preview_png(samples: torch.Tensor, reference: torch.Tensor | None = None) -> bytes:
    return grid_png(samples[:64]) if samples.ndim == 4 else scatter_png(samples, reference)


def class_grid_png(images: torch.Tensor, labels: torch.Tensor, per_row: int = 10, scale: int = 4) -> bytes:
    """Labelled image grid: one row per class (ascending), up to ``per_row`` images of that class each,
    pixels enlarged ``scale`` times (nearest), the class written in a left margin. Images in [-1, 1]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    x = x.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    labels = torch.as_tensor(labels).cpu().long()
    classes = labels.unique().tolist()
    _, c, h, w = x.shape
    margin, pad = 24, 2
    img = Image.new("RGB", (margin + per_row * (w + pad), len(classes) * (h + pad)), "white")
    draw = ImageDraw.Draw(img)
    for r, cls in enumerate(classes):
        top = r * (h + pad)
        draw.text((6, top + h // 2 - 5), str(cls), fill=(0, 0, 0))
        for q, i in enumerate((labels == cls).nonzero().squeeze(1)[:per_row].tolist()):
            tile = x[i].permute(1, 2, 0).numpy()
            tile = Image.fromarray(tile[..., 0] if c == 1 else tile[..., :3]).convert("RGB")
            img.paste(tile, (margin + q * (w + pad), top))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
