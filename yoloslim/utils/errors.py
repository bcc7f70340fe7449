"""The one exception type users see: its message names the problem and the fix, on one line."""


class YoloslimError(Exception):
    """A problem with the user's input or environment that yoloslim reports without a traceback."""
