"""The one error type that the CLI turns into a one-line message and exit code 2."""


class TTAError(Exception):
    """A problem the user can act on: bad input, missing data, mismatched checkpoint."""
