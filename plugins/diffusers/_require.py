"""diffusers, transformers and peft are optional: imported lazily, with one clear error when missing."""

from __future__ import annotations

import importlib

from core.errors import UsageError


def require(module: str = "diffusers"):
    """Import an optional dependency of the diffusers plugin or raise a UsageError naming the fix."""
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
