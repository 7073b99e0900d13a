"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class FsadError(Exception):
    """Bad input or a missing resource; the message says which file and what was expected."""
