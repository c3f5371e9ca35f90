"""User-facing errors: one line that names the problem and the fix."""


class FlexDiTError(Exception):
    """An error caused by the user's input (file, option, shape), not by a bug in flexdit.

    The command line prints its message as a single line and exits with status 2.
    """
