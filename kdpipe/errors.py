"""The one error type for user mistakes; the CLI turns it into one line and exit status 2."""


class UserError(Exception):
    """A bad job file, missing data, refused auth: something the user can fix, reported without a traceback."""
