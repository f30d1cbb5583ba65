"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """A problem with something the user gave us (a file, a param, a flag), stated in one line."""

    exit_code = 2
