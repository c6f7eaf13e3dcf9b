"""The one error type for every user-facing failure: the CLI prints its message on one line and exits 2."""


class LitAdapterError(Exception):
    """A problem with the user's input (a file, a record, a setting) that the message explains."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): foreign libraries' errors
    often run over several lines, and ours are one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
