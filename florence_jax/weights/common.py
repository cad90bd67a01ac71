"""What the native and the original-layout export share (kept apart so neither imports the other for it)."""

from __future__ import annotations


class ExportError(ValueError):
    """A model that the requested layout cannot represent (the message says what to do instead)."""
