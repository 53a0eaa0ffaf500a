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
