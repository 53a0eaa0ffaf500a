"""On-disk caches of encoder outputs, shared across runs: prompt embeddings (text encoders) and image latents
(the VAE). Each entry is one small safetensors file under ``ROOT/<kind>/<encoder fingerprint>/<ab>/<key>``,
written through fsspec (any URL) with a rename so readers never see half a file. The fingerprint covers the
encoders' files (names, sizes, modification times), their dtype and the encoding options, so a changed
encoder never reads stale entries and runs with the same encoders reuse them.

ROOT is ``teacher.embedding_cache`` / ``data.cache_dir``, else ``$FEWSTEP_CACHE`` (default ~/.cache/fewstep);
``none`` turns the disk cache off.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

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
