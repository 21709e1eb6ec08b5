"""User-facing errors: mistakes a user can fix (bad arguments, missing files), reported without a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in user input (arguments, paths, model folders). The CLI prints it as one ``error:`` line."""


class ModelFolderError(UserError):
    """A model folder that is missing or incomplete; the message names the missing file."""
