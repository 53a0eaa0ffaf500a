"""Where a teacher pipeline comes from: a local folder, any fsspec URL (copied once to a local cache),
or a Hugging Face hub id where a hub is reachable."""

from __future__ import annotations

import hashlib
import json
import os

import fsspec

from core.errors import UsageError
from plugins.diffusers._require import dtype_kwarg, require

CACHE = os.environ.get("FEWSTEP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fewstep"))


def local_folder(path: str, cache_dir: str = "") -> str:
    """A local directory holding the pipeline (model_index.json at its root)."""
    if not path:
        raise UsageError("the diffusers teachers need teacher.path=FOLDER|URL|HUB_ID (a diffusers pipeline)")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise UsageError(f"teacher.path={path} has no model_index.json; point it at a diffusers pipeline folder "
                             "(the output of save_pretrained)")
        return path
    if "://" in path:
        return _copy_remote(path, cache_dir or os.path.join(CACHE, "teachers"))
    if os.path.exists(path) or path.startswith((".", "/", "~")):
        raise UsageError(f"teacher.path={path}: no such folder")
    return _from_hub(path)


def _copy_remote(url: str, cache_dir: str) -> str:
    """Copy ``url`` once into ``cache_dir/<hash>``; a ``.complete`` marker makes interrupted copies retry."""
    dest = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{root.rstrip('/')}/model_index.json"):
        raise UsageError(f"teacher.path={url} has no model_index.json; point it at a diffusers pipeline folder")
    os.makedirs(dest, exist_ok=True)
    fs.get(root.rstrip("/") + "/", dest + "/", recursive=True)
    with open(os.path.join(dest, ".complete"), "w") as f:
        f.write(url)
    return dest


def _from_hub(repo_id: str) -> str:
    hub = require("huggingface_hub")
    try:
        return hub.snapshot_download(repo_id)
    except Exception as exc:  # offline, unknown repo, gated repo: all the same fix for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"teacher.path={repo_id}: not a local folder and the Hugging Face hub could not serve it "
                         f"({first}); download the pipeline and pass its folder") from None


def load_pipeline(folder: str, torch_dtype=None):
    """``DiffusionPipeline.from_pretrained`` that tolerates absent optional encoders (SD3 without T5)."""
    diffusers = require("diffusers")
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    cls = getattr(diffusers, index.get("_class_name", "DiffusionPipeline"), diffusers.DiffusionPipeline)
    expected, _ = cls._get_signature_keys(cls) if hasattr(cls, "_get_signature_keys") else ([], None)
    missing = {k: None for k in expected if index.get(k, [None])[0] is None}
    kwargs = dtype_kwarg(torch_dtype) if torch_dtype is not None else {}
    try:
        return diffusers.DiffusionPipeline.from_pretrained(folder, **missing, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"teacher.path={folder}: diffusers could not load it ({str(exc).splitlines()[0]})") from None
