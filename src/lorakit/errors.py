"""Errors a user can cause. Each message names the file or key and says what to do.

The CLI prints ``str(error)`` on one line and exits 2; anything else is a bug (exit 1, traceback).
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of every error the user can cause (bad input, bad option, bad file)."""


class TargetError(LorakitError):
    """A target pattern matched nothing, or a module cannot carry an adapter."""


class ShapeError(LorakitError):
    """An adapter's tensors do not fit the layer it is attached to, or are inconsistent with each other."""


class AdapterError(LorakitError):
    """An adapter name is unknown, already used, or the operation does not fit its state."""


class FileFormatError(LorakitError):
    """A file is damaged, lies in its header, or is not what it claims to be."""


class UnsafeFileError(LorakitError):
    """A pickled file was offered without the caller opting in to load it."""


class OutputError(LorakitError):
    """An output path cannot be written (it is an input, its folder is missing or read-only, the disk is full)."""


class InputError(LorakitError):
    """An input file is missing, is a folder, or cannot be read (permissions)."""


class ConfigError(LorakitError, ValueError):
    """An option or configuration value is out of range or inconsistent."""
