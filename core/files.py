"""Files of a run on any fsspec URL (local paths, memory://, s3://...): tensors as safetensors, JSON, and bytes
written to a temporary name and then moved, so a reader never sees half a file. Never pickle."""

from __future__ import annotations

import json
import os
import posixpath

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def url_to_fs(url: str):
    """(filesystem, path) of a URL or local path."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def write_bytes_atomic(url: str, data: bytes) -> None:
    fs, path = url_to_fs(url)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def save_tensors(url: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    clean = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    write_bytes_atomic(url, st_save(clean, metadata=meta or None))


def load_tensors(url: str, device="cpu") -> dict[str, torch.Tensor]:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        tensors = st_load(f.read())
    return {k: v.to(device) for k, v in tensors.items()}


def read_json(url: str):
    fs, path = url_to_fs(url)
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(url: str, obj) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=1, sort_keys=True).encode())


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def join(url: str, *parts: str) -> str:
    return posixpath.join(url, *parts) if "://" in url else os.path.join(url, *parts)
