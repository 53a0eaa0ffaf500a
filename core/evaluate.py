"""``python -m core.evaluate``: image quality of a text-to-image run, with maintained metric implementations.

    python -m core.evaluate run=RUN prompts=FILE reference=FOLDER fid_model=FILE clip_model=FOLDER [num=N]

The run's student generates ``num`` images (default: one per prompt; prompts are cycled) with its own sampler
and ``seed``. Metrics (torchmetrics), each computed when its model is given; weights come only from the paths
given, nothing is downloaded:

- FID against the images in ``reference`` (any size; center-cropped and resized to the generated size):
  ``fid_model=FILE`` is a TorchScript feature extractor, float images [N, 3, H, W] in [0, 1] -> features [N, D]
  (e.g. an Inception-v3 saved with ``torch.jit.save``); ``fid_model=inception fid_weights=FILE`` uses
  torchmetrics' InceptionV3 (torch-fidelity's FID network) with that weights file.
- CLIP score (torchmetrics' CLIPScore: 100 x the cosine of image and prompt embeddings, averaged over the
  samples, then floored at 0; Hessel et al. floor each sample before averaging): ``clip_model=FOLDER`` holds a
  transformers ``CLIPModel`` and ``CLIPProcessor`` (``save_pretrained``).

``prompts=`` reads what ``data=prompts`` reads (.txt, a folder of .txt, .csv or .jsonl with ``column=``).
Results go to stdout and to ``out=`` (default RUN/evaluation.json); ``samples=FILE.npz`` keeps the images.
"""

from __future__ import annotations

import io
import json
import sys
import warnings

import numpy as np
import torch

from core import files
from core.cli import guard, load_tree
from core.errors import UsageError
from core.registry import get_registry

KEYS = ("run", "prompts", "column", "reference", "fid_model", "fid_weights", "clip_model", "num", "seed", "batch",
        "device", "out", "samples")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise UsageError("python -m core.evaluate needs torchmetrics; install it with "
                         "pip install 'fewstep[diffusers]' (or pip install torchmetrics)") from None


def _int(args: dict, key: str, default: int) -> int:
    try:
        value = int(args.get(key, default))
    except (TypeError, ValueError):
        raise UsageError(f"{key} must be an integer, got {args[key]!r}") from None
    if value <= 0:
        raise UsageError(f"{key} must be > 0, got {value}")
    return value


def load_prompts(path: str, column: str, registry) -> list[str]:
    """The prompts that ``data=prompts data.path=PATH`` would draw from."""
    if "prompts" not in registry.plugins["dataset"]:
        raise UsageError("prompts= needs the prompts dataset (pip install 'fewstep[diffusers]')")
    entry = registry.get("dataset", "prompts")
    return list(entry.factory(entry.config(path=path, column=column)).prompts)


def load_reference(folder: str, size: tuple[int, int]) -> torch.Tensor:
    """Images of ``folder`` in [0, 1], center-cropped to the aspect of ``size`` = (H, W) and resized to it."""
    import fsspec
    from PIL import Image

    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.isdir(root):
        raise UsageError(f"reference={folder}: no such folder")
    files = sorted(p for p in fs.ls(root, detail=False) if p.lower().endswith(IMAGE_EXTS))
    if len(files) < 2:
        raise UsageError(f"reference={folder} holds {len(files)} images; FID needs at least 2 ({', '.join(IMAGE_EXTS)})")
    out = []
    for p in files:
        img = Image.open(io.BytesIO(fs.cat_file(p))).convert("RGB")
        w, h = img.size
        scale = max(size[0] / h, size[1] / w)
        cw, ch = min(w, round(size[1] / scale)), min(h, round(size[0] / scale))
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch)).resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def fid_metric(model: str, weights: str | None, device):
    """torchmetrics' FrechetInceptionDistance on the given feature extractor (inputs: floats in [0, 1])."""
    import os

    from torchmetrics.image.fid import FrechetInceptionDistance

    if model == "inception":
        if not weights or not os.path.isfile(weights):
            raise UsageError("fid_model=inception needs fid_weights=FILE, torch-fidelity's InceptionV3 weights "
                             "(pt_inception-2015-12-05); fewstep does not download them")
        try:  # torch-fidelity unpickles the file: let only plain tensors through
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(weights, map_location="cpu", weights_only=True)
        except Exception:
            raise UsageError(f"fid_weights={weights} holds more than plain tensors and could run code when loaded; "
                             "fewstep never unpickles code (give the state dict of tensors only)") from None
        try:
            return FrechetInceptionDistance(feature=2048, normalize=True,
                                            feature_extractor_weights_path=weights).to(device)
        except ModuleNotFoundError:
            raise UsageError("fid_model=inception needs torch-fidelity (pip install torch-fidelity), or pass "
                             "fid_model=FILE, a TorchScript feature extractor") from None
    if not os.path.isfile(model):
        raise UsageError(f"fid_model={model}: no such file (a TorchScript feature extractor, or 'inception')")
    try:
        extractor = torch.jit.load(model, map_location=device).eval()
    except RuntimeError as exc:
        raise UsageError(f"fid_model={model} is not a TorchScript module ({str(exc).splitlines()[0]}); save the "
                         "feature extractor with torch.jit.save") from None
    return FrechetInceptionDistance(feature=extractor, normalize=True).to(device)


def clip_metric(folder: str, device):
    """torchmetrics' CLIPScore with a transformers CLIP model and processor read from ``folder`` only."""
    import os

    from torchmetrics.multimodal.clip_score import CLIPScore

    if not os.path.isdir(folder):
        raise UsageError(f"clip_model={folder}: no such folder (a transformers CLIPModel + CLIPProcessor, "
                         "saved with save_pretrained)")

    def load():
        from transformers import CLIPModel, CLIPProcessor

        try:
            return (_FeatureTensors(CLIPModel.from_pretrained(folder, local_files_only=True)),
                    CLIPProcessor.from_pretrained(folder, local_files_only=True))
        except (OSError, ValueError) as exc:
            raise UsageError(f"clip_model={folder}: transformers could not load a CLIP model and processor from it "
                             f"({str(exc).splitlines()[0]})") from None

    return CLIPScore(model_name_or_path=load).to(device)


class _FeatureTensors(torch.nn.Module):
    """transformers 5 returns model outputs from ``get_*_features`` where torchmetrics expects tensors: unwrap."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


@torch.no_grad()
def generate_images(networks, spec, prompts: list[str], num: int, batch: int, device, registry) -> torch.Tensor:
    """``num`` images in [0, 1] from the run's student, prompts cycled, in batches of ``batch``."""
    from core.generation import generate

    teacher, model = networks.teacher, networks.student
    out = []
    for start in range(0, num, batch):
        chunk = [prompts[i % len(prompts)] for i in range(start, min(num, start + batch))]
        cond = teacher.encode_condition(chunk)
        z = generate(model, spec, len(chunk), cond, registry, device, batch=batch, shape=teacher.data_shape)
        out.append((teacher.to_data_space(z).float().cpu() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


@guard
def main(argv: list[str]) -> int:
    from core.roles import resolve_device, set_seed
    from core.rundir import load_run

    args = load_tree(argv)
    unknown = sorted(set(args) - set(KEYS))
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)}; python -m core.evaluate takes {', '.join(KEYS)}")
    for key in ("run", "prompts"):
        if key not in args:
            raise UsageError(f"python -m core.evaluate needs {key}=...; e.g. run=RUN prompts=prompts.txt "
                             "reference=FOLDER fid_model=FILE clip_model=FOLDER")
    if "reference" in args and "fid_model" not in args:
        raise UsageError("reference= is for FID; also give fid_model=FILE (TorchScript) or fid_model=inception "
                         "fid_weights=FILE")
    if "fid_model" in args and "reference" not in args:
        raise UsageError("fid_model= needs reference=FOLDER, the real images to compare with")
    if "fid_model" not in args and "clip_model" not in args:
        raise UsageError("nothing to compute: give fid_model=... reference=FOLDER and/or clip_model=FOLDER")
    _torchmetrics()
    registry = get_registry()
    device = resolve_device(str(args.get("device", "auto")))
    prompts = load_prompts(str(args["prompts"]), str(args.get("column", "prompt")), registry)
    num, batch = _int(args, "num", len(prompts)), _int(args, "batch", 8)
    fid = fid_metric(str(args["fid_model"]), args.get("fid_weights"), device) if "fid_model" in args else None
    clip = clip_metric(str(args["clip_model"]), device) if "clip_model" in args else None
    run = str(args["run"]).rstrip("/")
    networks, spec, _ = load_run(run, registry, device)
    teacher = networks.teacher
    if len(getattr(teacher, "data_shape", ())) != 3 or not hasattr(teacher, "bank"):
        raise UsageError(f"run={run} is not a text-to-image run; core.evaluate scores prompt-conditioned images")
    try:
        seed = int(args.get("seed", 0))
    except (TypeError, ValueError):
        raise UsageError(f"seed must be an integer, got {args['seed']!r}") from None
    set_seed(seed)
    images = generate_images(networks, spec, prompts, num, batch, device, registry)
    results = {"num": num, "prompts": str(args["prompts"]), "sampler": spec.sampler, "steps": len(spec.times) - 1}
    if fid is not None:
        reference = load_reference(str(args["reference"]), tuple(images.shape[-2:]))
        for part in reference.split(batch):
            fid.update(part.to(device), real=True)
        for part in images.split(batch):
            fid.update(part.to(device), real=False)
        results.update(fid=float(fid.compute()), reference_images=len(reference))
    if clip is not None:
        for start in range(0, num, batch):
            part = (images[start:start + batch] * 255).round().to(torch.uint8)
            clip.update(list(part.to(device)), [prompts[i % len(prompts)] for i in range(start, start + len(part))])
        results["clip_score"] = float(clip.compute())
    out = str(args.get("out", files.join(run, "evaluation.json")))
    files.write_bytes_atomic(out, (json.dumps(results, indent=1) + "\n").encode())
    if "samples" in args:
        buf = io.BytesIO()
        np.savez(buf, images=images.numpy(), prompts=np.array([prompts[i % len(prompts)] for i in range(num)]))
        files.write_bytes_atomic(str(args["samples"]), buf.getvalue())
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
