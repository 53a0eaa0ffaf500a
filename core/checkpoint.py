"""Checkpoints: the layout of a run's checkpoints and optimizer state as tensors + JSON (files through
core.files: safetensors and JSON, never pickle).

Layout under a run dir (any fsspec URL):
    checkpoints/step-00000500/{weights.safetensors, state.safetensors, state.json}
    checkpoints/latest.json        {"step": 500, "dir": "step-00000500"}
``latest.json`` is written last, to a temporary name and then moved, so a run killed at any moment
(kill -9 included) resumes from the last complete checkpoint.

Multi-process runs (docs/distributed.md) write a sharded checkpoint instead:
    checkpoints/step-00000500/{dcp/ (torch.distributed.checkpoint: weights, EMA, optimizers),
                               rng-00000.safetensors ... (one per rank), state.json}
    checkpoints/latest.json        {"step": 500, "dir": "step-00000500", "format": "dcp"}
DCP stores each tensor by name with its global shape, so a run saved on N ranks (DDP or FSDP shards)
loads on M ranks, or in one process.
"""

from __future__ import annotations

import posixpath

import torch

from core.errors import CheckpointError
from core.files import exists, join, load_tensors, makedirs, read_json, save_tensors, url_to_fs, write_json

MISMATCH_FIX = ("resume with the run's own settings (config=RUN/config.yaml), "
                "or start afresh with another out=")


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


def _differences(expected: dict[str, tuple], found: dict[str, tuple], limit: int = 3) -> list[str]:
    diffs = [f"{k}: shape {list(found[k])} in the file, {list(expected[k])} here"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing:
        diffs.append(f"missing {', '.join(missing[:limit])}{' ...' if len(missing) > limit else ''}")
    if extra:
        diffs.append(f"unexpected {', '.join(extra[:limit])}{' ...' if len(extra) > limit else ''}")
    return diffs


def load_modules(modules: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor], url: str) -> None:
    """Load ``NAME.param`` tensors into ``modules[NAME]``, after checking that every name and shape matches
    (a checkpoint of another objective or network size is an error naming the keys that differ)."""
    expected = {f"{name}.{k}": tuple(v.shape) for name, m in modules.items() for k, v in m.state_dict().items()}
    diffs = _differences(expected, {k: tuple(v.shape) for k, v in weights.items()})
    if diffs:
        raise CheckpointError(f"{url} was written by another config ({'; '.join(diffs)}); {MISMATCH_FIX}")
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")})


def load_optimizers(optimizers: dict, state: dict, tensors: dict, url: str) -> None:
    """Restore each phase's optimizer from ``state.json``'s structure and ``state.safetensors``'s tensors."""
    saved = state.get("optimizers", {})
    if sorted(saved) != sorted(optimizers):
        raise CheckpointError(f"{url} holds optimizers for phases {sorted(saved)}, this run has "
                              f"{sorted(optimizers)} (another objective's checkpoint); {MISMATCH_FIX}")
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(unflatten_optimizer(saved[name], tensors))
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{url}: optimizer state of phase '{name}' does not fit this run ({exc}); "
                                  f"{MISMATCH_FIX}") from None


class CheckpointStore:
    """Saves and restores a run's training state under ``RUN/checkpoints``."""

    def __init__(self, run_dir: str, keep: int = 2):
        self.root = join(run_dir, "checkpoints")
        self.keep = keep

    def latest(self) -> dict | None:
        url = join(self.root, "latest.json")
        if not exists(url):
            return None
        latest = read_json(url)
        if not (isinstance(latest, dict) and isinstance(latest.get("dir"), str)
                and isinstance(latest.get("step"), int)):
            raise CheckpointError(f"{url} should hold {{\"step\": N, \"dir\": \"step-...\"}}, got {latest!r}; "
                                  "point it at an existing step-* directory, or start afresh with another out=")
        return latest

    def save(self, step: int, weights: dict, state_tensors: dict, state: dict) -> str:
        name = f"step-{step:08d}"
        d = join(self.root, name)
        existed = exists(d)
        makedirs(d)
        try:
            save_tensors(join(d, "weights.safetensors"), weights)
            save_tensors(join(d, "state.safetensors"), state_tensors)
            write_json(join(d, "state.json"), state)
            write_json(join(self.root, "latest.json"), {"step": step, "dir": name})
        except BaseException:
            if not existed:  # a half-written step directory is debris; latest.json still names the last good one
                fs, path = url_to_fs(d)
                fs.rm(path, recursive=True)
            raise
        self._prune(name)
        return d

    def save_sharded(self, step: int, modules: dict, optimizers: dict, rng: dict, state: dict,
                     rank: int, main: bool) -> str:
        """Collective: every rank calls it. DCP writes weights and optimizers (each rank its shards),
        every rank writes its own RNG state, rank 0 writes ``state.json`` and then ``latest.json``."""
        import torch.distributed as dist

        name = f"step-{step:08d}"
        d = join(self.root, name)
        if main:
            makedirs(d)
        if dist.is_initialized():
            dist.barrier()
        save_sharded(join(d, "dcp"), sharded_state(modules, optimizers))
        save_tensors(join(d, f"rng-{rank:05d}.safetensors"), rng)
        if dist.is_initialized():
            dist.barrier()  # every rank's files are complete before latest.json points at them
        if main:
            write_json(join(d, "state.json"), {**state, "format": "dcp"})
            write_json(join(self.root, "latest.json"), {"step": step, "dir": name, "format": "dcp"})
            self._prune(name)
        return d

    def load_sharded(self, modules: dict, optimizers: dict, rank: int) -> tuple[dict, dict] | None:
        """Loads the latest sharded checkpoint into ``modules``/``optimizers`` (collective when a process
        group is up); returns (rng tensors of ``rank``, or of rank 0 when it had no such rank; state)."""
        latest = self.latest()
        if latest is None:
            return None
        d = join(self.root, latest["dir"])
        load_sharded(join(d, "dcp"), modules, optimizers)
        own = join(d, f"rng-{rank:05d}.safetensors")
        rng = load_tensors(own if exists(own) else join(d, "rng-00000.safetensors"))
        state = read_json(join(d, "state.json"))
        state["rng_rank"] = rank if exists(own) else 0
        return rng, state

    def load(self, device="cpu") -> tuple[dict, dict, dict] | None:
        latest = self.latest()
        if latest is None:
            return None
        if latest.get("format") == "dcp":
            raise ValueError("sharded checkpoint: use CheckpointStore.load_sharded")
        d = join(self.root, latest["dir"])
        if not exists(d):
            raise CheckpointError(f"{join(self.root, 'latest.json')} points at {latest['dir']}, which does not exist; "
                                  "point it at an existing step-* directory, or start afresh with another out=")
        state = read_json(join(d, "state.json"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "optimizers" not in state:
            raise CheckpointError(f"{join(d, 'state.json')} lacks the step or the optimizer state; "
                                  "point checkpoints/latest.json at an older step-* directory, "
                                  "or start afresh with another out=")
        return (load_tensors(join(d, "weights.safetensors"), device),
                load_tensors(join(d, "state.safetensors"), "cpu"), state)

    def _prune(self, current: str) -> None:
        fs, root = url_to_fs(self.root)
        dirs = sorted(p for p in fs.ls(root, detail=False) if posixpath.basename(p.rstrip("/")).startswith("step-"))
        for old in dirs[: max(0, len(dirs) - self.keep)]:
            if posixpath.basename(old.rstrip("/")) != current:
                fs.rm(old, recursive=True)


# -- sharded (torch.distributed.checkpoint) ------------------------------------------------------
def _root(modules: dict) -> torch.nn.Module:
    return torch.nn.ModuleDict(modules)


def sharded_state(modules: dict, optimizers: dict) -> dict:
    """{"model": FQN -> tensor (DTensor shards under FSDP), "optim.NAME": FQN-keyed optimizer state}.
    FQN keys (``student.backbone.inp.weight``) make optimizer state independent of world size."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = _root(modules)
    out = {"model": get_model_state_dict(root)}
    for name, opt in optimizers.items():
        out[f"optim.{name}"] = get_optimizer_state_dict(root, opt)
    return out


def _dcp_load(state: dict, reader) -> None:
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        if not dist.is_initialized():  # one process reading a checkpoint any number of ranks wrote
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, storage_reader=reader)


def _writer_reader(url: str):
    if "://" in url and not url.startswith("file://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        return FsspecWriter(url), FsspecReader(url)
    import torch.distributed.checkpoint as dcp

    path = url[len("file://"):] if url.startswith("file://") else url
    return dcp.FileSystemWriter(path), dcp.FileSystemReader(path)


def save_sharded(url: str, state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=_writer_reader(url)[0])


def load_sharded(url: str, modules: dict, optimizers: dict) -> None:
    """Fills ``modules`` and ``optimizers`` in place from a DCP checkpoint saved at any world size."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = sharded_state(modules, optimizers)  # target layout (allocates optimizer state)
    _dcp_load(state, _writer_reader(url)[1])
    root = _root(modules)
    set_model_state_dict(root, state["model"])
    for name, opt in optimizers.items():
        set_optimizer_state_dict(root, opt, state[f"optim.{name}"])


def load_sharded_module(url: str, module: torch.nn.Module, prefixes: list[str]) -> str:
    """Loads one network of a DCP checkpoint (the first of ``prefixes`` it holds, e.g. ``ema`` before
    ``student``) into a plain module, in one process; returns the prefix used."""
    reader = _writer_reader(url)[1]
    keys = reader.read_metadata().state_dict_metadata.keys()
    for prefix in prefixes:
        if any(k.startswith(f"model.{prefix}.") for k in keys):
            state = {"model": {f"{prefix}.{k}": v for k, v in module.state_dict().items()}}
            _dcp_load(state, _writer_reader(url)[1])
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in state["model"].items()})
            return prefix
    raise ValueError(f"{url} holds none of {prefixes}")
