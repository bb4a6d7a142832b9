"""Errors meant for the person using the app or the CLI."""


class UserError(ValueError):
    """Bad input or an unusable environment, with a one-line message that says what to do.

    The UI shows the message; the CLI prints it on one line and exits non-zero. Raising it must leave
    nothing stored changed.
    """
