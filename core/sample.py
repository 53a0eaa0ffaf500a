"""``python -m core.sample``: samples from a trained student or from a teacher with any sampler.

    python -m core.sample run=RUN_DIR num=10000 out=samples.npz [steps=K]
    python -m core.sample teacher=gmm teacher.preset=ring8 sampler=euler steps=8 num=10000 out=t.npz
    python -m core.sample run=RUN prompt="a photo of a cat" num=4 out=grid.png     (text-to-image runs)

The .npz holds ``samples`` (N x data dims, float32, data space) and, for class-conditional models,
``labels``; a PNG preview is written beside it. ``out=*.png`` writes only the image grid (one row per
class for class-conditional image models; ``label=C`` picks one class, ``guidance=W`` the CFG scale).
``prompt=`` conditions text-to-image teachers (default: the unconditional prompt); ``batch=`` bounds how
many samples go through the network at once.
"""

from __future__ import annotations

import io
import sys
from typing import Literal

import attrs
import numpy as np
import torch

from core import files
from core.cli import guard, load_tree
from core.config import converter
from core.errors import UsageError
from core.preview import class_grid_png, preview_png
from core.protocols import SamplingSpec
from core.registry import get_registry
from core.timesteps import make_grid

SAMPLE_KEYS = ("run", "num", "out", "steps", "seed", "device", "guidance", "label", "grid", "batch", "prompt")


def _get(tree, key, tp, default):
    if key not in tree:
        return default
    try:
        return converter.structure(tree[key], tp)
    except ValueError as exc:
        raise UsageError(f"{key}: {exc}") from None


def check_parent(url: str) -> None:
    """Fail before sampling (which can take long) when ``url`` cannot be written: unknown protocol,
    or a local directory that does not exist."""
    import os

    from core.files import url_to_fs

    fs, path = url_to_fs(url)
    parent = os.path.dirname(path)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) and parent \
            and not os.path.isdir(parent):
        raise UsageError(f"out={url}: the directory {parent} does not exist; create it or choose another out=")


def respaced(spec: SamplingSpec, schedule, steps: int, grid: str | None) -> SamplingSpec:
    """The same sampler on a ``steps``-step grid (students may define their own via ``with_steps``)."""
    times = make_grid(schedule, steps, grid or "polynomial")
    return attrs.evolve(spec, times=times.tolist())


def _picture(images, labels) -> bytes:
    """One row per class for labelled images, else a plain grid."""
    if labels is None:
        return preview_png(images)
    return class_grid_png(images, labels)


@guard
def main(argv: list[str]) -> int:
    from core.generation import generate
    from core.roles import resolve_device, set_seed
    from core.runconfig import DEFAULTS, resolve
    from core.rundir import load_run

    tree = load_tree(argv)
    sample_args = {k: tree.pop(k) for k in list(tree) if k in SAMPLE_KEYS}
    num = _get(sample_args, "num", int, 1000)
    if num <= 0:
        raise UsageError(f"num must be > 0, got {num}")
    out = str(sample_args.get("out", "samples.npz"))
    if not out.endswith((".npz", ".png")):
        raise UsageError(f"out={out}: expected a .npz path (or .png for an image grid)")
    check_parent(out)
    prompt = sample_args.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise UsageError("prompt= takes one string, e.g. prompt=\"a photo of a cat\"")
    steps = _get(sample_args, "steps", int, None)
    if steps is not None and steps <= 0:
        raise UsageError(f"steps must be > 0, got {steps}")
    device = resolve_device(_get(sample_args, "device", Literal["auto", "cpu", "cuda"], "auto"))
    seed = _get(sample_args, "seed", int, 0)
    set_seed(seed)
    guidance = _get(sample_args, "guidance", float, None)
    label = _get(sample_args, "label", int, None)
    registry = get_registry()
    if "run" in sample_args:
        if tree:
            raise UsageError(f"with run= only {', '.join(SAMPLE_KEYS)} are accepted; got {', '.join(tree)}")
        networks, spec, _ = load_run(str(sample_args["run"]), registry, device)
        model, teacher = networks.student, networks.teacher
        if steps is not None:
            with_steps = getattr(networks.objective, "with_steps", None)
            spec = with_steps(spec, steps, model) if with_steps else respaced(spec, model.schedule, steps, sample_args.get("grid"))
    else:
        if "teacher" not in tree:
            raise UsageError("give run=RUN_DIR (a trained student) or teacher=NAME (sample a teacher)")
        tree.setdefault("objective", "denoise")
        tree.setdefault("sampler", DEFAULTS["sampler"])
        cfg = resolve(tree, registry)
        teacher = registry.get("teacher", cfg.teacher.name).factory(cfg.teacher.config, device)
        model = teacher
        sampler_opts = attrs.asdict(cfg.sampler.config) if cfg.sampler.config is not None else {}
        spec = SamplingSpec(cfg.sampler.name, make_grid(teacher.schedule, steps or 32,
                                                        str(sample_args.get("grid", "polynomial"))).tolist(), sampler_opts)
        if guidance is None and (getattr(teacher, "num_classes", 0) or prompt is not None):
            guidance = getattr(teacher, "guidance", None)
    # again: building the networks may draw from the RNG (e.g. a freshly initialised layer), and the draws below
    # are then those of `torch.manual_seed(seed)`, as in an exported pipeline
    set_seed(seed)
    cond = None
    num_classes = getattr(teacher, "num_classes", 0)
    if label is not None and not 0 <= label < max(num_classes, 0):
        raise UsageError(f"label={label}: this model has {num_classes or 'no'} classes"
                         + (f"; use 0..{num_classes - 1}" if num_classes else "; drop label="))
    if prompt is not None:
        try:
            cond = teacher.encode_condition([prompt] * num)
        except (TypeError, ValueError):
            raise UsageError(f"prompt= needs a text-to-image teacher; {type(teacher).__name__} takes no prompts "
                             "(drop prompt=)") from None
    elif num_classes:
        if label is not None:
            labels = torch.full((num,), label, dtype=torch.long)
        elif out.endswith(".png"):  # a picture: every class in turn, so each grid row fills
            labels = torch.arange(num) % num_classes
        else:
            labels = torch.randint(0, num_classes, (num,))
        cond = teacher.encode_condition(labels)
    extra = {"guidance": guidance} if guidance is not None else {}
    images = len(teacher.data_shape) == 3
    batch = _get(sample_args, "batch", int, 8 if images else 4096)
    if batch <= 0:
        raise UsageError(f"batch must be > 0, got {batch}")
    samples = generate(model, spec, num, cond, registry, device, batch=batch, shape=teacher.data_shape, **extra)
    samples = teacher.to_data_space(samples).float().cpu()
    if out.endswith(".png"):
        if not images:
            raise UsageError(f"out={out}: a PNG grid needs image samples; this teacher's data has shape "
                             f"{tuple(teacher.data_shape)} (use out=FILE.npz)")
        files.write_bytes_atomic(out, _picture(samples, cond if prompt is None else None))
        print(f"wrote a grid of {num} images to {out} with {spec.sampler}, {len(spec.times) - 1} steps")
        return 0
    buf = io.BytesIO()
    arrays = {"samples": samples.flatten(1).numpy() if samples.ndim == 2 else samples.numpy()}
    if cond is not None and prompt is None:
        arrays["labels"] = cond.cpu().numpy()
    np.savez(buf, **arrays)
    files.write_bytes_atomic(out, buf.getvalue())
    png = out[:-4] + ".png"
    reference = teacher.sample_exact(min(num, 2000)) if hasattr(teacher, "sample_exact") else None
    picture = _picture(samples, cond) if images and prompt is None else preview_png(samples[:2000], reference)
    files.write_bytes_atomic(png, picture)
    print(f"wrote {num} samples to {out} (preview {png}) with {spec.sampler}, {len(spec.times) - 1} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
