"""The one exception type for bad user input, shared by every layer.

The CLI prints a `BasinError`'s message without a traceback and exits with status 2.
"""


class BasinError(ValueError):
    """Bad input from the user: a message that names the file, tensor, field or parameter."""
