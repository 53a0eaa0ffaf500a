"""diffusers, transformers and peft are optional: imported lazily, with one clear error when missing."""

from __future__ import annotations

import importlib
import os

from core.errors import UsageError


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
