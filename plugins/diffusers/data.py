"""Datasets ``prompts`` (text only: data-free distillation) and ``images`` (images with optional same-name .txt
captions, encoded once with the teacher's VAE: the GAN's and moment matching's real data), and the on-disk
caches of encoder outputs (prompt embeddings, image latents) shared across runs.
Draws use torch's global RNG so resumed runs see the same batches."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import uuid

import attrs
import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.config import positive
from core.errors import UsageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -- prompts -----------------------------------------------------------------------------------------
@attrs.define(kw_only=True)
class PromptsConfig:
    path: str = attrs.field(default="", metadata={"doc": "a .txt file (one prompt a line), a folder of .txt files, "
                                                         "a .csv or a .jsonl file; local or fsspec URL"})
    column: str = attrs.field(default="prompt", metadata={"doc": "CSV column / JSONL field holding the prompt"})


def read_prompts(path: str, column: str = "prompt") -> list[str]:
    """Prompts from ``path``: .csv (header row, column ``column``), .jsonl (field ``column`` of each object),
    a folder (every line of every .txt file in it, sorted by name) or any other text file (one a line)."""
    if not path:
        raise UsageError("data=prompts needs data.path=FILE|FOLDER (.txt one prompt a line, .csv, .jsonl)")
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        files = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".txt"))
        if not files:
            raise UsageError(f"data.path={path} is a folder without .txt files; give a prompt file or a folder "
                             "of .txt files")
        texts = [(p, fs.cat_file(p).decode("utf-8")) for p in files]
    elif not fs.exists(root):
        raise UsageError(f"data.path={path}: no such file")
    else:
        texts = [(root, fs.cat_file(root).decode("utf-8"))]
    prompts = []
    for name, text in texts:
        lower = name.lower()
        rows = (_csv_prompts(text, column, path) if lower.endswith(".csv") else
                _jsonl_prompts(text, column, path) if lower.endswith((".jsonl", ".ndjson")) else text.splitlines())
        prompts += [p.strip() for p in rows if p and p.strip()]
    if not prompts:
        raise UsageError(f"data.path={path} holds no prompts")
    return prompts


def _csv_prompts(text: str, column: str, path: str) -> list[str]:
    try:
        rows = list(csv.reader(io.StringIO(text), strict=True))
    except csv.Error as exc:
        raise UsageError(f"data.path={path}: malformed CSV ({exc}); quote fields that hold commas or quotes") from None
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if column not in header:
        raise UsageError(f"data.path={path} has no column '{column}' (columns: {', '.join(header)}); "
                         "set data.column=NAME")
    col = header.index(column)
    for line, row in enumerate(rows[1:], start=2):
        if row and len(row) != len(header):
            raise UsageError(f"data.path={path}: malformed CSV, row {line} has {len(row)} fields and the header "
                             f"{len(header)}; quote fields that hold commas")
    return [row[col] for row in rows[1:] if row]


def _jsonl_prompts(text: str, field: str, path: str) -> list[str]:
    out = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UsageError(f"data.path={path}: line {line} is not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise UsageError(f"data.path={path}: line {line} has no string field '{field}'; set data.column=NAME")
        out.append(obj[field])
    return out


class Prompts:
    """Prompts drawn uniformly with replacement (no images: data-free distillation, as DMD2 and SFD train)."""

    def __init__(self, config: PromptsConfig, teacher=None):
        self.prompts = read_prompts(config.path, config.column)

    def sample(self, n: int) -> dict:
        idx = torch.randint(len(self.prompts), (n,)).tolist()
        return {"x": None, "cond": [self.prompts[i] for i in idx]}


# -- images ------------------------------------------------------------------------------------------
@attrs.define(kw_only=True)
class ImagesConfig:
    path: str = attrs.field(default="", metadata={"doc": "folder of images (local or fsspec URL); a.txt captions a.png"})
    caption: str = attrs.field(default="", metadata={"doc": "caption for images without a .txt file"})
    batch: int = attrs.field(default=16, validator=positive, metadata={"doc": "VAE encoding batch"})
    buckets: bool = attrs.field(default=False, metadata={
        "doc": "aspect-ratio buckets: each image goes to the size of about the teacher's area closest to its "
               "aspect; every batch comes from one bucket (off: center-crop to teacher.resolution)"})
    max_aspect: float = attrs.field(default=2.0, validator=positive, metadata={"doc": "widest bucket, W/H or H/W"})
    cache_dir: str = attrs.field(default="", metadata={"doc": "latent cache folder or fsspec URL (default: "
                                                              "FEWSTEP_CACHE/latents; 'none' keeps them in memory)"})


def bucket_sizes(resolution: tuple[int, int], multiple: int, max_aspect: float) -> list[tuple[int, int]]:
    """(H, W) pairs, both multiples of ``multiple``, of about the area of ``resolution``, aspect within max_aspect."""
    area = resolution[0] * resolution[1]
    sizes = {tuple(resolution)}
    for h in range(multiple, int(math.sqrt(area * max_aspect)) + multiple, multiple):
        w = max(multiple, round(area / h / multiple) * multiple)
        if 1 / max_aspect <= w / h <= max_aspect:
            sizes.add((h, w))
    return sorted(sizes)


class ImageCaption(str):
    """A real image's caption that also carries SDXL's size conditioning for that image (Podell et al. 2023,
    sec. 2.2): ``original_size`` (H, W) of the file and ``crop_top_left`` (top, left) of the crop in the image
    resized to cover the target, as SDXL was trained. Everywhere else it is the caption string."""

    def __new__(cls, text: str, original_size: tuple[int, int], crop_top_left: tuple[int, int]):
        self = super().__new__(cls, text)
        self.original_size, self.crop_top_left = tuple(original_size), tuple(crop_top_left)
        return self

    def __getnewargs__(self):
        return str(self), self.original_size, self.crop_top_left


def _crop_box(w: int, h: int, size: tuple[int, int]) -> tuple[int, int, int, int, float]:
    """(left, top, width, height) of the center crop of a w x h image to the aspect of ``size`` = (H, W), in
    the image's pixels, and the scale that resizes the crop to ``size``."""
    th, tw = size
    scale = max(th / h, tw / w)
    cw, ch = min(w, round(tw / scale)), min(h, round(th / scale))
    return (w - cw) // 2, (h - ch) // 2, cw, ch, scale


def image_caption(text: str, w: int, h: int, size: tuple[int, int]) -> ImageCaption:
    left, top, _, _, scale = _crop_box(w, h, size)
    return ImageCaption(text, (h, w), (round(top * scale), round(left * scale)))


def _load_image(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """Center-crop to the aspect of ``size`` = (H, W), resize, scale to [-1, 1]: [3, H, W]."""
    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    left, top, cw, ch, _ = _crop_box(*img.size, size)
    img = img.crop((left, top, left + cw, top + ch)).resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


class Images:
    """Real images and their captions; latents computed once with the teacher's VAE, grouped by bucket."""

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
        self._groups: list[tuple[torch.Tensor, list[str]]] | None = None

    def _size(self, path: str) -> tuple[int, int]:
        from PIL import Image

        with self.fs.open(path, "rb") as f:
            return Image.open(f).size  # (w, h), from the header only

    def _encode(self) -> list[tuple[torch.Tensor, list[ImageCaption]]]:
        fs, teacher, cfg = self.fs, self.teacher, self.config
        sizes = bucket_sizes(teacher.resolution, teacher.size_multiple, cfg.max_aspect) if cfg.buckets \
            else [tuple(teacher.resolution)]
        members: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
        for p in self.files:
            w, h = self._size(p)
            size = min(sizes, key=lambda s: (abs(math.log(w / h) - math.log(s[1] / s[0])), s))
            members.setdefault(size, []).append((p, w, h))
        groups = []
        for size, entries in sorted(members.items()):
            images = [(content_key(fs.ukey(p), size), lambda p=p: _load_image(fs.cat_file(p), size))
                      for p, _, _ in entries]
            latents = cached_latents(teacher, images, cfg.batch, cfg.cache_dir)
            captions = []
            for p, w, h in entries:
                txt = os.path.splitext(p)[0] + ".txt"
                text = fs.cat_file(txt).decode().strip() if fs.exists(txt) else cfg.caption
                captions.append(image_caption(text, w, h, size))
            groups.append((latents, captions))
        return groups

    @property
    def groups(self) -> list[tuple[torch.Tensor, list[ImageCaption]]]:
        """(latents, captions) per bucket, encoded on first use (sampling a finished run never pays for it).
        Each caption carries its image's original size and crop for SDXL's size conditioning."""
        if self._groups is None:
            self._groups = self._encode()
        return self._groups

    @property
    def latents(self) -> torch.Tensor:
        """All latents of the single bucket (without buckets)."""
        if len(self.groups) != 1:
            raise ValueError("latents of a bucketed dataset differ in shape; use .groups")
        return self.groups[0][0]

    @property
    def captions(self) -> list[str]:
        return [c for _, caps in self.groups for c in caps]

    def sample(self, n: int) -> dict:
        """``n`` latents from one bucket (drawn in proportion to its size), each with its own caption."""
        groups = self.groups
        g = 0
        if len(groups) > 1:
            counts = torch.tensor([len(c) for _, c in groups], dtype=torch.float64)
            g = int(torch.multinomial(counts, 1))
        latents, captions = groups[g]
        idx = torch.randint(len(latents), (n,))
        return {"x": latents[idx], "cond": [captions[i] for i in idx.tolist()]}


# -- encoder-output caches -------------------------------------------------------------------------
# On-disk caches of encoder outputs, shared across runs: prompt embeddings (text encoders) and image latents
# (the VAE). Each entry is one small safetensors file under ``ROOT/<kind>/<encoder fingerprint>/<ab>/<key>``,
# written through fsspec (any URL) with a rename so readers never see half a file. The fingerprint covers the
# encoders' files (names, sizes, modification times), their dtype and the encoding options, so a changed
# encoder never reads stale entries and runs with the same encoders reuse them.
#
# ROOT is ``teacher.embedding_cache`` / ``data.cache_dir``, else ``$FEWSTEP_CACHE`` (default ~/.cache/fewstep);
# ``none`` turns the disk cache off.

OFF = ("none", "off", "false")


def cache_root() -> str:
    return os.environ.get("FEWSTEP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fewstep"))


def fingerprint(folder: str, components: list[str], *extra) -> str:
    """Hash of the components' files under ``folder`` (relative name, size, mtime) and ``extra`` settings."""
    h = hashlib.sha256(repr(extra).encode())
    for name in components:
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        for dirpath, _, files in sorted(os.walk(sub)):
            for f in sorted(files):
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{os.path.relpath(os.path.join(dirpath, f), folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


def content_key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


class TensorStore:
    """``key -> {name: tensor}`` as safetensors files in one folder (local or fsspec URL)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        try:
            return st_load(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except Exception:  # a truncated or foreign file: recompute (and overwrite) rather than fail the run
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(key)
        data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)


def store_for(setting: str, kind: str, key: str) -> TensorStore | None:
    """The store of ``kind`` (prompts, latents) for encoder fingerprint ``key``; None when turned off."""
    if setting.strip().lower() in OFF:
        return None
    return TensorStore(f"{(setting or cache_root()).rstrip('/')}/{kind}/{key}")


def cached_latents(teacher, images: list, batch: int, cache_dir: str = "") -> torch.Tensor:
    """Latents of ``images`` = [(key, load() -> [3, H, W] in [-1, 1]), ...], encoded with the teacher's VAE in
    chunks of ``batch``; entries already in the disk cache are read, not encoded, and images are loaded only
    when encoded. The VAE posterior draw of each image is seeded by its key, so latents do not depend on
    batching and leave torch's global RNG alone."""
    store = store_for(cache_dir, "latents", teacher.vae_fingerprint)
    out: list[torch.Tensor | None] = [None] * len(images)
    if store is not None:
        for i, (key, _) in enumerate(images):
            hit = store.get(key)
            out[i] = None if hit is None else hit["latent"]
    todo = [i for i, v in enumerate(out) if v is None]
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        seeds = [int(images[i][0][:15], 16) for i in chunk]
        x = torch.stack([images[i][1]() for i in chunk]).to(teacher.device)
        z = teacher.to_model_space(x, seeds=seeds).cpu()
        for i, zi in zip(chunk, z):
            out[i] = zi
            if store is not None:
                store.put(images[i][0], {"latent": zi})
    return torch.stack(out)
