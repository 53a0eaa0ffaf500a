"""Checkpoints over fsspec: safetensors for tensors, JSON for the rest, never pickle.

Layout under a run dir (any fsspec URL):
    checkpoints/step-00000500/{weights.safetensors, state.safetensors, state.json}
    checkpoints/latest.json        {"step": 500, "dir": "step-00000500"}
``latest.json`` is written last, to a temporary name and then moved, so a run killed at any moment
(kill -9 included) resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import posixpath

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def _fs(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def write_bytes_atomic(url: str, data: bytes) -> None:
    fs, path = _fs(url)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def save_tensors(url: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    clean = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    write_bytes_atomic(url, st_save(clean, metadata=meta or None))


def load_tensors(url: str, device="cpu") -> dict[str, torch.Tensor]:
    fs, path = _fs(url)
    with fs.open(path, "rb") as f:
        tensors = st_load(f.read())
    return {k: v.to(device) for k, v in tensors.items()}


def read_json(url: str):
    fs, path = _fs(url)
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(url: str, obj) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=1, sort_keys=True).encode())


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def join(url: str, *parts: str) -> str:
    return posixpath.join(url, *parts) if "://" in url else __import__("os").path.join(url, *parts)


# -- optimizer state <-> (tensors, json) -----------------------------------------------------------
def flatten_optimizer(prefix: str, state: dict) -> tuple[dict, dict]:
    tensors, structure = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        structure["state"][str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{key}"] = value
                structure["state"][str(pid)][key] = {"tensor": f"{prefix}.{pid}.{key}"}
            else:
                structure["state"][str(pid)][key] = value
    return tensors, structure


def unflatten_optimizer(structure: dict, tensors: dict) -> dict:
    state = {}
    for pid, entries in structure["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in entries.items()}
    return {"state": state, "param_groups": structure["param_groups"]}


class CheckpointStore:
    """Saves and restores a run's training state under ``RUN/checkpoints``."""

    def __init__(self, run_dir: str, keep: int = 2):
        self.root = join(run_dir, "checkpoints")
        self.keep = keep

    def latest(self) -> dict | None:
        url = join(self.root, "latest.json")
        return read_json(url) if exists(url) else None

    def save(self, step: int, weights: dict, state_tensors: dict, state: dict) -> str:
        name = f"step-{step:08d}"
        d = join(self.root, name)
        fs, path = _fs(d)
        fs.makedirs(path, exist_ok=True)
        save_tensors(join(d, "weights.safetensors"), weights)
        save_tensors(join(d, "state.safetensors"), state_tensors)
        write_json(join(d, "state.json"), state)
        write_json(join(self.root, "latest.json"), {"step": step, "dir": name})
        self._prune(name)
        return d

    def load(self, device="cpu") -> tuple[dict, dict, dict] | None:
        latest = self.latest()
        if latest is None:
            return None
        d = join(self.root, latest["dir"])
        return (load_tensors(join(d, "weights.safetensors"), device),
                load_tensors(join(d, "state.safetensors"), "cpu"),
                read_json(join(d, "state.json")))

    def _prune(self, current: str) -> None:
        fs, root = _fs(self.root)
        dirs = sorted(p for p in fs.ls(root, detail=False) if posixpath.basename(p.rstrip("/")).startswith("step-"))
        for old in dirs[: max(0, len(dirs) - self.keep)]:
            if posixpath.basename(old.rstrip("/")) != current:
                fs.rm(old, recursive=True)
