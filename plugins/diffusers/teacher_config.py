"""Options of the diffusers teachers (kept apart so registering them imports no diffusers)."""

from __future__ import annotations

from typing import Literal

import attrs

from core.config import positive


@attrs.define(kw_only=True)
class DiffusersTeacherConfig:
    path: str = attrs.field(default="", metadata={"doc": "pipeline folder, fsspec URL or hub id"})
    resolution: int | None = attrs.field(default=None, validator=positive,
                                         metadata={"doc": "image size in pixels (default: the model's native size)"})
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = attrs.field(
        default="auto", metadata={"doc": "teacher weights; auto: bf16 on CUDA, fp32 on CPU"})
    attention: Literal["sdpa", "xformers"] = attrs.field(
        default="sdpa", metadata={"doc": "attention backend (xformers needs CUDA and the xformers package)"})
    gradient_checkpointing: bool = attrs.field(default=False,
                                               metadata={"doc": "on the trainable copies (student, critic)"})
    guidance: float = attrs.field(default=5.0, metadata={"doc": "CFG scale when sampling the teacher itself"})
    export: bool = attrs.field(default=True, metadata={"doc": "write RUN/export as a diffusers pipeline at the end"})
    export_dtype: Literal["fp32", "fp16", "bf16"] = attrs.field(default="fp32",
                                                                metadata={"doc": "dtype of the exported UNet"})
    cache_dir: str = attrs.field(default="", metadata={"doc": "where fsspec URLs are copied (default ~/.cache/fewstep)"})
