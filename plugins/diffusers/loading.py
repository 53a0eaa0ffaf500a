"""Where a teacher pipeline comes from: a diffusers folder, a single-file ``.safetensors`` checkpoint (converted
once into a diffusers folder in the cache with ``from_single_file``), any fsspec URL of either (copied once to
a local cache), or a Hugging Face hub id where a hub is reachable. Pickled checkpoints are refused.

diffusers, transformers and peft are optional: ``require`` imports them lazily, with one clear error when missing.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os

import fsspec
import torch

from core.errors import UsageError
from plugins.diffusers.data import cache_root

def require(module: str = "diffusers"):
    """Import an optional dependency of the diffusers plugin or raise a UsageError naming the fix."""
    _quiet_libraries()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"the diffusers plugin needs '{module}' ({exc}); install it with "
                         "pip install 'fewstep[diffusers]'") from None


def dtype_kwarg(dtype) -> dict:
    """``{"dtype": d}`` where diffusers takes it, ``{"torch_dtype": d}`` on versions before the rename."""
    import importlib.util

    renamed = importlib.util.find_spec("diffusers.utils.deprecation_utils") is not None and hasattr(
        importlib.import_module("diffusers.utils.deprecation_utils"), "_resolve_dtype")
    return {"dtype" if renamed else "torch_dtype": dtype}


def _quiet_libraries() -> None:
    """Loading a pipeline prints progress bars and import-time notices from diffusers and transformers; fewstep's
    own output (and its one-line errors) should stand alone. FEWSTEP_LIBRARY_LOGS=1 keeps them."""
    if os.environ.get("FEWSTEP_LIBRARY_LOGS") == "1":
        return
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers", "transformers"):
        try:
            logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        logging.set_verbosity_error()
        logging.disable_progress_bar()


# -- the teacher's pipeline ------------------------------------------------------------------------
PICKLED = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flow": "StableDiffusion3Pipeline"}


def load_teacher(config, family: str | None, dtype):
    """(diffusers folder, pipeline) for ``teacher.path`` (see the module docstring)."""
    path = config.path
    if path.lower().endswith(PICKLED):
        raise UsageError(f"teacher.path={path} is a pickled checkpoint, and loading it could run arbitrary code; "
                         "convert it to .safetensors (or a diffusers folder) and pass that")
    if path.lower().endswith(".safetensors"):
        folder = single_file_folder(path, config, family or "sdxl")
    else:
        folder = local_folder(path, config.cache_dir)
    return folder, load_pipeline(folder, torch_dtype=dtype, variant=config.variant or None,
                                 fp32_vae=dtype == torch.float16 and vae_forces_upcast(folder))


def vae_forces_upcast(folder: str) -> bool:
    """The VAE config's ``force_upcast`` (SDXL's VAE overflows fp16): decode and encode it in fp32."""
    try:
        with open(os.path.join(folder, "vae", "config.json")) as f:
            return bool(json.load(f).get("force_upcast", False))
    except FileNotFoundError:
        return False


def single_file_folder(path: str, config, family: str) -> str:
    """Convert a single-file checkpoint once (diffusers' ``from_single_file``, offline) into a diffusers folder under
    ``FEWSTEP_CACHE/teachers/<hash>``, so trainable copies and exports load it like any pipeline folder."""
    diffusers = require("diffusers")
    cache_dir = config.cache_dir or os.path.join(cache_root(), "teachers")
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isfile(root):
        raise UsageError(f"teacher.path={path}: no such file")
    if not config.config_folder:
        # without it diffusers infers a hub repo and downloads its configs: never at run time
        raise UsageError(f"teacher.path={path} is a single-file checkpoint; also pass teacher.config_folder=FOLDER, a "
                         "diffusers folder of the same architecture (e.g. the base model's), for its configs")
    if not os.path.exists(os.path.join(config.config_folder, "model_index.json")):
        raise UsageError(f"teacher.config_folder={config.config_folder} has no model_index.json; point it at a "
                         "diffusers folder of the same architecture (e.g. the base model's)")
    key = hashlib.sha256(f"{fs.ukey(root)}|{config.config_folder}|{family}".encode()).hexdigest()[:16]
    dest = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest
    local = root if "://" not in path else _copy_file(fs, root, os.path.join(cache_dir, key + ".safetensors"))
    with open(os.path.join(config.config_folder, "model_index.json")) as f:
        cls_name = json.load(f).get("_class_name", PIPELINES[family])
    cls = getattr(diffusers, cls_name)
    extra = {"text_encoder_3": None, "tokenizer_3": None} if cls_name.startswith("StableDiffusion3") and not \
        _has_t5(config.config_folder) else {}
    if cls_name.startswith("StableDiffusion") and not cls_name.startswith(("StableDiffusion3", "StableDiffusionXL")):
        extra["safety_checker"] = None
    try:
        pipe = cls.from_single_file(local, config=config.config_folder, local_files_only=True, **extra)
    except Exception as exc:  # diffusers raises many types here; the fix is the same
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(f"teacher.path={path}: diffusers' from_single_file could not load it with the configs of "
                         f"teacher.config_folder={config.config_folder} ({first}); check that both are the same "
                         "architecture") from None
    pipe.save_pretrained(dest)
    with open(os.path.join(dest, ".complete"), "w") as f:
        f.write(path)
    return dest


def _has_t5(folder: str) -> bool:
    with open(os.path.join(folder, "model_index.json")) as f:
        return (json.load(f).get("text_encoder_3") or [None])[0] is not None


def _copy_file(fs, root: str, dest: str) -> str:
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get(root, dest + ".part")
        os.replace(dest + ".part", dest)
    return dest


def local_folder(path: str, cache_dir: str = "") -> str:
    """A local directory holding the pipeline (model_index.json at its root)."""
    if not path:
        raise UsageError("the diffusers teachers need teacher.path=FOLDER|FILE.safetensors|URL|HUB_ID")
    if os.path.isfile(path):
        raise UsageError(f"teacher.path={path} is a file; give a diffusers folder or a single-file .safetensors "
                         "checkpoint")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise UsageError(f"teacher.path={path} has no model_index.json; point it at a diffusers pipeline folder "
                             "(the output of save_pretrained)")
        return path
    if "://" in path:
        return _copy_remote(path, cache_dir or os.path.join(cache_root(), "teachers"))
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


def load_pipeline(folder: str, torch_dtype=None, variant: str | None = None, fp32_vae: bool = False):
    """``DiffusionPipeline.from_pretrained`` that tolerates absent optional encoders (SD3 without T5)."""
    diffusers = require("diffusers")
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    cls = getattr(diffusers, index.get("_class_name", "DiffusionPipeline"), diffusers.DiffusionPipeline)
    expected, _ = cls._get_signature_keys(cls) if hasattr(cls, "_get_signature_keys") else ([], None)
    missing = {k: None for k in expected if index.get(k, [None])[0] is None}
    kwargs = dtype_kwarg(torch_dtype) if torch_dtype is not None else {}
    if variant:
        kwargs["variant"] = variant
    try:
        if fp32_vae:  # loaded in fp32 from the start: its weights never pass through fp16
            vae_cls = getattr(diffusers, index["vae"][1])
            missing["vae"] = vae_cls.from_pretrained(folder, subfolder="vae", **dtype_kwarg(torch.float32),
                                                     **({"variant": variant} if variant else {}))
        return diffusers.DiffusionPipeline.from_pretrained(folder, **missing, **kwargs)
    except (OSError, ValueError) as exc:
        hint = ""
        if not variant and _variants(folder):
            hint = f"; this folder holds {', '.join(sorted(_variants(folder)))} weights only: pass teacher.variant=" \
                   f"{sorted(_variants(folder))[0]}"
        raise UsageError(f"teacher.path={folder}: diffusers could not load it ({str(exc).splitlines()[0]}){hint}") \
            from None


def _variants(folder: str) -> set[str]:
    """Weight variants present in a pipeline folder (``model.fp16.safetensors`` -> fp16)."""
    found = set()
    for _, _, files in os.walk(folder):
        for f in files:
            parts = f.split(".")
            if len(parts) == 3 and parts[-1] in ("safetensors", "bin"):
                found.add(parts[1])
    return found
