"""Datasets ``prompts`` (one prompt a line) and ``images`` (a folder of images with optional same-name
.txt captions, encoded once with the teacher's VAE and kept as latents: the GAN's real data).
Draws use torch's global RNG so resumed runs see the same batches."""

from __future__ import annotations

import io
import os

import attrs
import fsspec
import torch

from core.config import positive
from core.errors import UsageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@attrs.define(kw_only=True)
class PromptsConfig:
    path: str = attrs.field(default="", metadata={"doc": "text file (local or fsspec URL), one prompt a line"})


class Prompts:
    """Prompts from a file, drawn uniformly with replacement (no images: data-free distillation)."""

    def __init__(self, config: PromptsConfig, teacher=None):
        if not config.path:
            raise UsageError("data=prompts needs data.path=FILE (one prompt a line)")
        try:
            with fsspec.open(config.path, "r", encoding="utf-8") as f:
                self.prompts = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            raise UsageError(f"data.path={config.path}: no such file") from None
        if not self.prompts:
            raise UsageError(f"data.path={config.path} holds no prompts (one prompt a line)")

    def sample(self, n: int) -> dict:
        idx = torch.randint(len(self.prompts), (n,)).tolist()
        return {"x": None, "cond": [self.prompts[i] for i in idx]}


@attrs.define(kw_only=True)
class ImagesConfig:
    path: str = attrs.field(default="", metadata={"doc": "folder of images (local or fsspec URL); a.txt captions a.png"})
    caption: str = attrs.field(default="", metadata={"doc": "caption for images without a .txt file"})
    batch: int = attrs.field(default=16, validator=positive, metadata={"doc": "VAE encoding batch"})


def _load_image(data: bytes, size: int) -> torch.Tensor:
    """Center-crop to a square, resize to ``size``, scale to [-1, 1], [3, size, size]."""
    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


class Images:
    """Real images and their captions; latents computed once with the teacher's VAE and cached in memory."""

    def __init__(self, config: ImagesConfig, teacher):
        if not config.path:
            raise UsageError("data=images needs data.path=FOLDER (images, optional same-name .txt captions)")
        if not hasattr(teacher, "to_model_space") or not hasattr(teacher, "resolution"):
            raise UsageError("data=images needs a diffusers teacher (sdxl, sd15, sd3, flow)")
        fs, root = fsspec.core.url_to_fs(config.path)
        if not fs.isdir(root):
            raise UsageError(f"data.path={config.path}: no such folder")
        self.files = sorted(p for p in fs.ls(root, detail=False) if p.lower().endswith(IMAGE_EXTS))
        if not self.files:
            raise UsageError(f"data.path={config.path} holds no images ({', '.join(IMAGE_EXTS)})")
        self.fs, self.config, self.teacher = fs, config, teacher
        self._latents: torch.Tensor | None = None
        self.captions: list[str] = []

    @property
    def latents(self) -> torch.Tensor:
        """Encoded on first use (so sampling a finished run never pays for it), then kept."""
        if self._latents is None:
            fs, teacher, latents, captions = self.fs, self.teacher, [], []
            for start in range(0, len(self.files), self.config.batch):
                chunk = self.files[start:start + self.config.batch]
                images = torch.stack([_load_image(fs.cat_file(p), teacher.resolution) for p in chunk])
                # the VAE posterior draw uses its own seeded stream: same latents every time, and the
                # global RNG (which resumes restore) is left untouched
                cuda = [teacher.device] if teacher.device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):
                    torch.manual_seed(start)
                    latents.append(teacher.to_model_space(images.to(teacher.device)).cpu())
                for p in chunk:
                    txt = os.path.splitext(p)[0] + ".txt"
                    captions.append(fs.cat_file(txt).decode().strip() if fs.exists(txt) else self.config.caption)
            self._latents, self.captions = torch.cat(latents), captions
        return self._latents

    def sample(self, n: int) -> dict:
        latents = self.latents
        idx = torch.randint(len(latents), (n,))
        return {"x": latents[idx], "cond": [self.captions[i] for i in idx.tolist()]}
