"""Options of the diffusers teachers (kept apart so registering them imports no diffusers)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from core.config import positive


@attrs.define(kw_only=True)
class DiffusersTeacherConfig:
    path: str = attrs.field(default="", metadata={"doc": "pipeline folder, single-file .safetensors, fsspec URL "
                                                         "of either, or hub id"})
    config_folder: str = attrs.field(default="", metadata={
        "doc": "single-file checkpoints: a diffusers folder of the same architecture whose configs (and missing "
               "parts) to use; nothing is downloaded"})
    variant: str = attrs.field(default="", metadata={"doc": "weight variant to load, e.g. fp16 (model.fp16.safetensors)"})
    resolution: Any = attrs.field(default=None, converter=lambda v: height_width(v, "teacher.resolution"),
                                  metadata={"doc": "image size in pixels: N (square) or [H,W] (default: native)"})
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = attrs.field(
        default="auto", metadata={"doc": "teacher weights; auto: bf16 on CUDA, fp32 on CPU"})
    attention: Literal["sdpa", "xformers"] = attrs.field(
        default="sdpa", metadata={"doc": "attention backend (xformers needs CUDA and the xformers package)"})
    gradient_checkpointing: bool = attrs.field(default=False,
                                               metadata={"doc": "on the trainable copies (student, critic)"})
    guidance: float | None = attrs.field(
        default=None, metadata={"doc": "teacher CFG scale (DMD2's real score, teacher sampling); "
                                       "default: DMD2's 8 for SDXL, 1.75 for SD1.5; 7 for SD3"})
    max_sequence_length: int = attrs.field(default=256, validator=positive,
                                           metadata={"doc": "SD3: T5 tokens per prompt (pass the same to the pipeline)"})
    export: bool = attrs.field(default=True, metadata={"doc": "write RUN/export as a diffusers pipeline at the end"})
    export_dtype: Literal["fp32", "fp16", "bf16"] = attrs.field(default="fp32",
                                                                metadata={"doc": "dtype of the exported UNet"})
    cache_dir: str = attrs.field(default="", metadata={"doc": "where fsspec URLs are copied and single files converted "
                                                              "(default $FEWSTEP_CACHE/teachers)"})
    embedding_cache: str = attrs.field(default="", metadata={
        "doc": "prompt-embedding cache folder or fsspec URL, reused by runs with the same text encoders "
               "(default $FEWSTEP_CACHE/prompts; 'none': in memory only)"})
    prompt_cache_items: int = attrs.field(default=1024, validator=positive, metadata={
        "doc": "prompt embeddings kept in memory (the rest are read from the disk cache when drawn)"})


def height_width(value, name: str) -> tuple[int, int] | None:
    """N -> (N, N); [H, W] or "H,W" -> (H, W); None stays None (the model's native size)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, str):
        value = [v for v in value.strip("[]() ").split(",") if v.strip()]
    items = list(value) if isinstance(value, (list, tuple)) else [value, value]
    try:
        hw = tuple(int(v) for v in items)
        ok = len(hw) == 2 and all(float(v) == int(v) for v in items)
    except (TypeError, ValueError):
        ok = False
    if not ok or min(hw) <= 0:
        raise ValueError(f"{name} takes a positive size N or [H,W], got {value!r}")
    return hw
