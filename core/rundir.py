"""The run directory: claiming it (a different run's directory is refused), holding its lock while training,
the files that describe a run, the exported student, and ``load_run`` for sampling a finished or running run.

    RUN/config.yaml   the resolved config          RUN/meta.json           how the student samples
    RUN/metrics.jsonl one record per log           RUN/student.safetensors the exported student (EMA when on)
    RUN/checkpoints/  core.checkpoint's layout     RUN/preview.png         the latest preview
Files are written through core.files (atomic on every fsspec filesystem).
"""

from __future__ import annotations

import contextlib

import attrs
import yaml

from core import checkpoint as ckpt
from core import distributed, files
from core.errors import RunDirError, RunLockedError, UsageError
from core.lock import LOCK_NAME, RunLock
from core.protocols import SamplingSpec
from core.registry import Registry

DAMAGED_FIX = "restore the file from a backup, or retrain into a new out="

# Settings that may change when a run resumes: how long it trains and how the work is spread.
RESUMABLE = {("train", "steps"), ("train", "progress"), ("train", "device"), ("train", "parallel"),
             ("train", "fsdp_offload"), ("train", "compile"), ("train", "compile_mode"), ("train", "dry_run")}


def _with_current_defaults(tree: dict) -> dict:
    """A saved config as this version resolves it: options added since the run was written take their
    defaults, so upgrading fewstep does not make its runs look like different ones."""
    from core.runconfig import resolve

    try:
        return resolve(tree).to_dict()
    except Exception:  # noqa: BLE001 (no longer resolvable: compare as written, the diff names the keys)
        return tree


def claim(cfg) -> None:
    """Rank 0, before anything is written: ``out`` must be new, empty, or hold this same run (to resume).
    This is the one place a run takes its directory."""
    out = cfg.out.rstrip("/")
    RunLock(out).check()  # a live run in this directory: say so before anything else
    cfg_url = files.join(out, "config.yaml")
    if not files.exists(cfg_url):
        fs, path = files.url_to_fs(out)
        if fs.exists(path) and [p for p in fs.ls(path, detail=False) if not p.rstrip("/").endswith(LOCK_NAME)]:
            raise RunDirError(f"out={out} exists and is not a fewstep run; choose an empty or new directory")
        return
    old = _with_current_defaults(_read_config(cfg_url))
    new = cfg.to_dict()
    ignore = set(RESUMABLE)
    if new["train"].get("batch_scope") == "global":  # micro-batches of a fixed global batch
        ignore.add(("train", "grad_accum"))
    diffs = []
    for group in set(old) | set(new):
        a, b = old.get(group), new.get(group)
        if group == "sampler":  # older runs saved an unread default sampler in config.yaml
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for k in set(a) | set(b):
                if (group, k) not in ignore and a.get(k) != b.get(k):
                    diffs.append(f"{group}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b and group != "out":
            diffs.append(f"{group}: {a!r} -> {b!r}")
    if diffs:
        raise RunDirError(f"out={out} holds a run with a different config ({'; '.join(sorted(diffs)[:3])}); "
                         "pass the same settings to resume it, or choose another out=")


@contextlib.contextmanager
def locked(out: str, log, main: bool):
    """Rank 0 holds ``out``'s lock (core.lock) for the block; when it cannot, every rank raises."""
    lock, error = None, None
    if main:
        try:
            lock = RunLock(out, log).acquire()
        except UsageError as exc:
            error = exc
    message = distributed.broadcast_object(None if error is None else str(error))
    if message:
        raise error if error is not None else RunLockedError(message)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _read_config(url: str) -> dict:
    tree = files.read_yaml(url, fix=DAMAGED_FIX)
    if not isinstance(tree, dict):
        raise RunDirError(f"{url} holds no run config ({type(tree).__name__}); {DAMAGED_FIX}")
    return tree


def write_run_files(cfg, spec: SamplingSpec) -> None:
    out = cfg.out.rstrip("/")
    files.makedirs(out)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    files.write_bytes_atomic(files.join(out, "config.yaml"), text.encode())
    files.write_json(files.join(out, "meta.json"), {"sampling": attrs.asdict(spec)})


def export(out: str, model, spec: SamplingSpec, owners) -> str:
    """The student (EMA when on) as ``RUN/student.safetensors``; each owner's ``export`` (a teacher's pipeline
    folder, an objective's extras) may add richer exports."""
    url = files.join(out, "student.safetensors")
    files.save_tensors(url, model.state_dict())
    for owner in owners:
        exporter = getattr(owner, "export", None)
        if exporter is not None:
            exporter(model, spec, out)
    return url


def load_run(run_dir: str, registry: Registry | None = None, device="cpu"):
    """(networks, spec, config) of a finished or running run; the student holds the exported weights
    (or the latest checkpoint's student/EMA when the run has not finished)."""
    from core.roles import Networks
    from core.runconfig import resolve

    run_dir = run_dir.rstrip("/")
    cfg_url = files.join(run_dir, "config.yaml")
    if not files.exists(cfg_url):
        raise RunDirError(f"run={run_dir} is not a fewstep run (no config.yaml); pass the out= dir of a training run")
    cfg = resolve(_read_config(cfg_url), registry)
    meta_url = files.join(run_dir, "meta.json")
    meta = files.read_json(meta_url, fix=DAMAGED_FIX)
    if not isinstance(meta, dict) or not isinstance(meta.get("sampling"), dict):
        raise RunDirError(f"{meta_url} lacks the sampling spec; {DAMAGED_FIX}")
    try:
        spec = SamplingSpec(**meta["sampling"])
    except TypeError as exc:
        raise RunDirError(f"{meta_url}: bad sampling spec ({exc}); {DAMAGED_FIX}") from None
    networks = Networks(cfg, registry, device, with_critic=False)
    student_url = files.join(run_dir, "student.safetensors")
    if files.exists(student_url):
        weights = files.load_tensors(student_url, device, fix=DAMAGED_FIX)
        ckpt.load_modules({"student": networks.student}, {f"student.{k}": v for k, v in weights.items()}, student_url)
    else:
        store = ckpt.CheckpointStore(run_dir)
        latest = store.latest()
        if latest is None:
            raise RunDirError(f"run={run_dir} has no checkpoint yet; wait for its first checkpoint")
        if latest.get("format") == "dcp":
            ckpt.load_sharded_module(files.join(store.root, latest["dir"], "dcp"), networks.student,
                                     ["ema", "student"])
        else:
            weights = store.load(device)[0]
            prefix = "ema." if any(k.startswith("ema.") for k in weights) else "student."
            ckpt.load_modules({"student": networks.student},
                              {"student." + k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                              files.join(store.root, latest["dir"], "weights.safetensors"))
    networks.student.requires_grad_(False).eval()
    return networks, spec, cfg
