"""The run directory: claiming it (a different run's directory is refused), the files that describe a run,
the exported student, and ``load_run`` for sampling a finished or running run.

    RUN/config.yaml   the resolved config          RUN/meta.json           how the student samples
    RUN/metrics.jsonl one record per log           RUN/student.safetensors the exported student (EMA when on)
    RUN/checkpoints/  core.checkpoint's layout     RUN/preview.png         the latest preview
Files are written through core.files (atomic on every fsspec filesystem).
"""

from __future__ import annotations

import attrs
import fsspec
import yaml

from core import checkpoint as ckpt
from core import files
from core.errors import UsageError
from core.protocols import SamplingSpec
from core.registry import Registry

# Settings that may change when a run resumes: how long it trains and how the work is spread.
RESUMABLE = {("train", "steps"), ("train", "progress"), ("train", "device"), ("train", "parallel"),
             ("train", "fsdp_offload")}


def claim(cfg) -> None:
    """Rank 0, before anything is written: ``out`` must be new, empty, or hold this same run (to resume).
    This is the one place a run takes its directory."""
    out = cfg.out.rstrip("/")
    cfg_url = files.join(out, "config.yaml")
    if not files.exists(cfg_url):
        fs, path = fsspec.core.url_to_fs(out)
        if fs.exists(path) and fs.ls(path):
            raise UsageError(f"out={out} exists and is not a fewstep run; choose an empty or new directory")
        return
    with fsspec.open(cfg_url, "r") as f:
        old = yaml.safe_load(f)
    new = cfg.to_dict()
    ignore = set(RESUMABLE)
    if new["train"].get("batch_scope") == "global":  # micro-batches of a fixed global batch
        ignore.add(("train", "grad_accum"))
    diffs = []
    for group in set(old) | set(new):
        a, b = old.get(group), new.get(group)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in set(a) | set(b):
                if (group, k) not in ignore and a.get(k) != b.get(k):
                    diffs.append(f"{group}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b and group != "out":
            diffs.append(f"{group}: {a!r} -> {b!r}")
    if diffs:
        raise UsageError(f"out={out} holds a run with a different config ({'; '.join(sorted(diffs)[:3])}); "
                         "pass the same settings to resume it, or choose another out=")


def write_run_files(cfg, spec: SamplingSpec) -> None:
    out = cfg.out.rstrip("/")
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
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
        raise UsageError(f"run={run_dir} is not a fewstep run (no config.yaml); pass the out= dir of a training run")
    with fsspec.open(cfg_url, "r") as f:
        tree = yaml.safe_load(f)
    cfg = resolve(tree, registry)
    networks = Networks(cfg, registry, device, with_critic=False)
    student_url = files.join(run_dir, "student.safetensors")
    if files.exists(student_url):
        networks.student.load_state_dict(files.load_tensors(student_url, device))
    else:
        store = ckpt.CheckpointStore(run_dir)
        latest = store.latest()
        if latest is None:
            raise UsageError(f"run={run_dir} has no checkpoint yet; wait for its first checkpoint")
        if latest.get("format") == "dcp":
            ckpt.load_sharded_module(files.join(store.root, latest["dir"], "dcp"), networks.student,
                                     ["ema", "student"])
        else:
            weights = store.load(device)[0]
            prefix = "ema." if any(k.startswith("ema.") for k in weights) else "student."
            networks.student.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    networks.student.requires_grad_(False).eval()
    meta = files.read_json(files.join(run_dir, "meta.json"))
    spec = SamplingSpec(**meta["sampling"])
    return networks, spec, cfg
