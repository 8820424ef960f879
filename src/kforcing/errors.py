"""The one exception type users see: the CLI prints its message on one line and exits 1."""


class KForcingError(Exception):
    """A problem with the user's input or files (bad k, missing checkpoint, unknown corpus...)."""
