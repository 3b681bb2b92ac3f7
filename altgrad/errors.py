"""Errors that are the user's to fix: the CLI prints their message, no traceback, exit 2."""


class UserError(Exception):
    """Bad input (unknown format, bad config, missing data): say what is wrong and what to do."""

    exit_code = 2
