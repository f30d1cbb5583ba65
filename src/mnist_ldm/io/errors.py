"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """A problem with something the user gave us (a file, a param, a flag), stated in one line."""

    exit_code = 2


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name if it has none), cut to `limit` characters."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."
