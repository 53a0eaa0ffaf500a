"""Fixed-seed short trainings whose weights must stay bit-identical across refactors.

``python tests/bitident.py --write`` records sha256 checksums of every saved tensor (trainable networks, EMA,
optimizer state, exported student) into tests/data/bitident.json; tests/test_bit_identical.py re-runs the same
trainings and compares. Each run is ``python -m core.run`` in its own process with one intra-op thread, since
the thread count changes how float sums are split and so the last bits of the weights.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

CHECKSUMS = Path(__file__).parent / "data" / "bitident.json"
COMMON = ["train.progress=false", "train.eval_every=0", "train.preview_every=0", "train.eval_samples=64", "seed=3"]
TEACHER = ["objective=denoise", "teacher=gmm", "teacher.preset=cls4", "train.steps=20", "train.batch=64",
           "student.hidden=64", "student.depth=2"]


def runs(teacher_dir: str) -> dict[str, list[str]]:
    """name -> overrides; ``denoise`` trains the network teacher the distillation runs start from."""
    net = ["teacher=checkpoint", f"teacher.path={teacher_dir}"]
    return {
        "denoise": TEACHER,
        "dmd2": ["train.steps=6", "train.batch=64", "train.ema=0.9"],  # the default demo run, shortened
        # warm-up, linear decay, clipping and two micro-batches per step (RNG replay)
        "dmd2-accum": ["train.steps=5", "train.batch=64", "train.grad_accum=2", "train.warmup=2",
                       "train.lr_decay=linear", "train.grad_clip=1.0"],
        "sfd": ["objective=sfd", *net, "train.steps=3", "train.batch=32", "objective.nfe=2"],
        "sfd-v": ["objective=sfd-v", "student=copy-nfe", *net, "train.steps=3", "train.batch=32",
                  "objective.nfe_min=2"],
        "mm": ["objective=mm", "teacher=gmm", "student.hidden=32", "student.depth=1", "train.steps=6",
               "train.batch=32"],
        "mm-param": ["objective=mm-param", *net, "student=copy", "train.steps=4", "train.batch=32"],
    }


def tensor_digest(path: str) -> str:
    h = hashlib.sha256()
    tensors = load_file(path)
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_digests(out: str) -> dict[str, str]:
    """sha256 per saved tensor file of a run: the last checkpoint (weights + optimizer state) and the export."""
    latest = json.loads(Path(out, "checkpoints", "latest.json").read_text())
    files = sorted(glob.glob(os.path.join(out, "checkpoints", latest["dir"], "*.safetensors")))
    files.append(os.path.join(out, "student.safetensors"))
    return {os.path.relpath(f, out).replace(os.sep, "/").replace(latest["dir"], "last"): tensor_digest(f)
            for f in files}


def train(name: str, overrides: list[str], root: str) -> dict[str, str]:
    out = os.path.join(root, name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FEWSTEP_TENSORBOARD": "0"}
    proc = subprocess.run([sys.executable, "-m", "core.run", *COMMON, *overrides, f"out={out}"],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return run_digests(out)


def all_digests(root: str) -> dict[str, dict[str, str]]:
    teacher = os.path.join(root, "denoise")
    return {name: train(name, overrides, root) for name, overrides in runs(teacher).items()}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        digests = all_digests(tmp)
    if "--write" in sys.argv:
        CHECKSUMS.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(json.dumps(digests, indent=1, sort_keys=True))
