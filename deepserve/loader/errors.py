"""Errors raised while finding, converting or loading a model.

The CLI prints `str(error)` and exits; the message alone must tell the user which file is at fault
and what is wrong with it, so every raise site names the path.
"""

from __future__ import annotations


class LoadError(RuntimeError):
    """A model, checkpoint file or tokenizer that cannot be loaded; the message names the file."""
