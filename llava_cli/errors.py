"""The one exception type the CLI turns into a one-line message and an exit code."""


class LlavaError(Exception):
    """A failure the user can act on: printed as one line on stderr, exit code 1."""

    exit_code = 1


class UsageError(LlavaError):
    """Arguments that cannot be read or do not fit together: exit code 2, as for any wrong usage."""

    exit_code = 2
