"""Model errors: each says what could not be resolved, built or loaded and how to fix it."""

from __future__ import annotations


class ModelError(RuntimeError):
    """A model could not be resolved, built or loaded; the message says what and how to fix it."""
