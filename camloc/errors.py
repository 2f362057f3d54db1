"""User-facing errors: one line that names the input and says what to do.

One exception type per kind, all `CamlocError` (the command line prints any of them as one line and
exits with 2); from Python, catch the kind you can act on:
- `OptionError`: an option's value or a combination of options (also a ValueError);
- `DataError`: a dataset's files: missing, not in the official format, or not the data a run used;
- `ImageError`: an image file that cannot be read or is too large;
- `ModelError`: a model that cannot be had (unknown name, weights not found offline, a bad checkpoint);
- `RunFolderError`: a run folder that cannot be used (another config's results, locked, unwritable, incomplete).
"""


class CamlocError(Exception):
    """An error caused by the user's input or environment; the CLI prints it and exits non-zero."""

    exit_code = 2


class OptionError(CamlocError, ValueError):
    """An option's value, or a combination of options, that cannot be used."""


class DataError(CamlocError):
    """A dataset's files are missing, not in their official format, or not the data a run was made on."""


class ImageError(CamlocError):
    """An image file cannot be read, or is larger than allowed."""


class ModelError(CamlocError):
    """A model cannot be had: an unknown name, weights missing offline, a checkpoint that does not load."""


class RunFolderError(CamlocError):
    """A run folder cannot be used: it holds another config's results, is locked, unwritable or incomplete."""


__all__ = ["CamlocError", "DataError", "ImageError", "ModelError", "OptionError", "RunFolderError"]
