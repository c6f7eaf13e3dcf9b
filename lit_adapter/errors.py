"""The one error type for every user-facing failure: the CLI prints its message on one line and exits 2."""


class LitAdapterError(Exception):
    """A problem with the user's input (a file, a record, a setting) that the message explains."""
