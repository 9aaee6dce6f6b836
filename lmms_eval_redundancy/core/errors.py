"""The one base of every error a user can fix: our commands print its message without a traceback."""


class UserError(ValueError):
    """Bad input or environment: the message names the problem and the fix."""
