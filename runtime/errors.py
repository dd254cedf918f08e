"""The runtime's error types. Every message names the bad input and the fix, on one line."""

from __future__ import annotations


class InputError(ValueError):
    """A bad argument or input file (description, gallery, query, option)."""


class EngineUnavailable(RuntimeError):
    """The inference backend asked for cannot run here (not installed, no GPU, wrong engines)."""
