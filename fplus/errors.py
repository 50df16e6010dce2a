"""The one exception type the CLI turns into a single-line error message."""


class FplusError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
