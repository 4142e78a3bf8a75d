"""The one exception type the CLI turns into a one-line message and an exit code."""


class LlavaError(Exception):
    """A failure the user can act on: printed as one line on stderr, exit code 1."""

    exit_code = 1
