"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input or an unusable environment: printed as one line, exit code 2, no traceback."""
