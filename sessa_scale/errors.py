"""Errors caused by user input. The CLI prints their message as one paragraph (no traceback)
and exits with status 2."""


class UserError(Exception):
    """Bad input from the user: a config value, a path, a missing checkpoint."""

    exit_code = 2
