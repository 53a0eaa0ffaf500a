"""User-facing errors: one line, ``<what> (<which file/key>); <the fix>``; the CLI exits with code 2.

Every class below is a ``UsageError``: something the user (or their machine) can fix, so the CLI prints
one line and no traceback. Anything else that escapes is a bug in fewstep or a plugin and keeps its
traceback. ``--debug`` or ``FEWSTEP_DEBUG=1`` shows the traceback for everything.
"""

from __future__ import annotations

import difflib


class UsageError(Exception):
    """Bad input from the user (unknown plugin, bad key, wrong type, out of range, bad path)."""


class ConfigError(UsageError):
    """An option, override or config file that cannot be used as given."""


class PluginError(UsageError):
    """A plugin that is unknown, filtered out by the environment, failed to import, or clashes."""


class RunDirError(UsageError):
    """A run directory that is damaged, incomplete, or holds a different run."""


class CheckpointError(RunDirError):
    """A checkpoint or exported file that is missing, truncated, not safetensors, or from another config."""


class StorageError(UsageError):
    """An output that cannot be written: full disk, read-only target, unknown fsspec protocol."""


class RunLockedError(UsageError):
    """Another live process is writing to the same run directory."""


class DivergedError(UsageError):
    """A non-finite loss under ``train.nan_policy=stop``."""


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for a close match, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices) -> PluginError:
    choices = sorted(choices)
    listed = ", ".join(choices) if choices else "none installed"
    return PluginError(f"unknown {kind} '{name}'{suggest(name, choices)}; available: {listed}")


_OS_CAUSES = {  # errno -> (what happened, the fix)
    "ENOSPC": ("no space left on the device", "free some space or choose another out="),
    "EDQUOT": ("disk quota exceeded", "free some space or choose another out="),
    "EROFS": ("read-only file system", "choose a writable out="),
    "EACCES": ("permission denied", "choose a directory you can write to, or fix its permissions"),
    "EPERM": ("operation not permitted", "choose a directory you can write to, or fix its permissions"),
}


def storage_error(exc: OSError, url: str | None = None, doing: str = "writing") -> StorageError | None:
    """A one-line StorageError for an OSError the user's machine caused (full disk, read-only, permission);
    None for any other OSError (those stay bugs with tracebacks)."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    if name not in _OS_CAUSES:
        return None
    what, fix = _OS_CAUSES[name]
    where = url or exc.filename or "?"
    return StorageError(f"{what} while {doing} ({where}); {fix}")
