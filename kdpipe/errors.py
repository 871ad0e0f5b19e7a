"""The one error type for user mistakes (the CLI turns it into one line and exit status 2), and any failure as one
line."""


class UserError(Exception):
    """A bad job file, missing data, refused auth: something the user can fix, reported without a traceback."""


def one_line(err: BaseException) -> str:
    """The innermost cause of a (possibly Ray-wrapped) failure, as one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"
