"""User-facing errors: one line that names the input and says what to do."""


class CamlocError(Exception):
    """An error caused by the user's input or environment; the CLI prints it and exits non-zero."""

    exit_code = 2
