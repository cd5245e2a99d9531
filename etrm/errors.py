"""User-facing errors: one line saying what is wrong and what to do; the CLIs print it and exit with code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, run directory, checkpoint)."""
