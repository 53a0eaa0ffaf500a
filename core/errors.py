"""User-facing errors: one line that names the problem and the fix; the CLI exits with code 2."""

from __future__ import annotations

import difflib


class UsageError(Exception):
    """Bad input from the user (unknown plugin, bad key, wrong type, out of range, bad path)."""


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for a close match, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices) -> UsageError:
    choices = sorted(choices)
    listed = ", ".join(choices) if choices else "none installed"
    return UsageError(f"unknown {kind} '{name}'{suggest(name, choices)}; available: {listed}")
