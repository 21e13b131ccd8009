"""The one error a library run reports to its user."""


class LibraryError(Exception):
    """A problem with the arguments, the folder or the output file; the message is one line for the user."""
