"""The one exception type users see: its message names the problem and the fix, on one line."""


class YoloslimError(Exception):
    """A problem with the user's input or environment that yoloslim reports without a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of a library's exception message (its type where it has none), to quote inside a one-line
    YoloslimError."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
