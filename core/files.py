"""Files of a run on any fsspec URL (local paths, memory://, s3://...): tensors as safetensors, JSON, YAML,
and bytes; never pickle. Every failure a user can fix is one line that names the file.

Every write goes to a unique temporary name beside the target (``.NAME.<pid>-<random>.tmp``) and is
moved over it only when complete; on any failure the temporary file is removed, so a full disk or a
killed process never leaves a partial target or a stray ``.tmp`` behind, and two processes never
share a temporary name. Reads turn a missing, truncated or non-safetensors file into a
``CheckpointError`` that names the file and the fix; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid

import fsspec
import torch
import yaml
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.errors import CheckpointError, StorageError, storage_error


def url_to_fs(url: str):
    """(fsspec filesystem, path) for ``url``; an unknown or not-installed protocol is a StorageError."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise StorageError(f"cannot open {url}: {exc} (the fsspec backend for this protocol is not installed); "
                           "pip install it, or use a local path") from None
    except ValueError as exc:
        if "protocol" not in str(exc).lower():
            raise
        known = ", ".join(sorted(p for p in fsspec.available_protocols() if len(p) <= 8)[:12])
        raise StorageError(f"cannot open {url}: {exc}; use a local path or an fsspec protocol such as "
                           f"{known}") from None


def join(url: str, *parts: str) -> str:
    return posixpath.join(url, *parts) if "://" in url else os.path.join(url, *parts)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    try:
        fs.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise StorageError(f"cannot create directory {url}: a file of that name is in the way; "
                           "choose another out=") from None
    except OSError as exc:
        raise storage_error(exc, url, "creating a directory") or exc from None


def _temporary(path: str) -> str:
    head, tail = posixpath.split(path) if "/" in path else ("", path)
    name = f".{tail}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    return posixpath.join(head, name) if head else name


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` all at once or not at all."""
    fs, path = url_to_fs(url)
    tmp = _temporary(path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        if isinstance(exc, OSError):
            err = storage_error(exc, url)
            if err is not None:
                raise err from None
        raise


def write_json(url: str, obj) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=1, sort_keys=True).encode())


def save_tensors(url: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    clean = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    write_bytes_atomic(url, st_save(clean, metadata=meta or None))


# -- reads ------------------------------------------------------------------------------------------
DAMAGED_FIX = ("restore the file, point checkpoints/latest.json at an older step-* directory, "
               "or start afresh with another out=")


def read_bytes(url: str, what: str = "", fix: str = DAMAGED_FIX) -> bytes:
    what = what or "file"
    return _read(url, f"missing {what} ({url}); {fix}", f"{what} is a directory ({url}); {fix}")


def _read(url: str, missing: str, directory: str, error: type = CheckpointError) -> bytes:
    """The file's bytes; a missing file or a directory raises ``error`` with the given message, any other
    failure a one-line storage error."""
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise error(missing) from None
    except IsADirectoryError:
        raise error(directory) from None
    except OSError as exc:
        raise storage_error(exc, url, "reading") or exc from None


def _describe_payload(data: bytes) -> str:
    if data[:2] == b"PK":
        return "a zip archive (a torch.save pickle?), not safetensors; fewstep never unpickles files"
    if data[:1] == b"\x80":
        return "a pickle, not safetensors; fewstep never unpickles files"
    if len(data) < 8:
        return f"truncated ({len(data)} bytes)"
    header = int.from_bytes(data[:8], "little")
    if header > len(data) - 8:
        return f"truncated or not safetensors (header says {header} bytes, file has {len(data)})"
    return "truncated or corrupt safetensors"


def load_tensors(url: str, device="cpu", fix: str = DAMAGED_FIX) -> dict[str, torch.Tensor]:
    data = read_bytes(url, fix=fix)
    try:
        tensors = st_load(data)
    except Exception:  # a parser of untrusted bytes: any failure means a damaged or foreign file
        raise CheckpointError(f"cannot load {url}: {_describe_payload(data)}; {fix}") from None
    return {k: v.to(device) for k, v in tensors.items()}


def read_json(url: str, fix: str = DAMAGED_FIX):
    data = read_bytes(url, fix=fix)
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {url}: not valid JSON ({exc}); {fix}") from None


def read_yaml(url: str, what: str = "", fix: str = DAMAGED_FIX):
    """A YAML file; ``what`` names it in errors (e.g. ``config=FILE``)."""
    from core.errors import ConfigError

    label = what or url
    data = _read(url, f"{label}: no such file ({url}); {fix}", f"{label}: a directory, not a YAML file ({url}); {fix}",
                 ConfigError)
    try:
        return yaml.safe_load(data.decode())
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: not a text file (binary data in {url}); {fix}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML ({str(exc).splitlines()[0]}); {fix}") from None
