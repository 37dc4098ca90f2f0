"""The one exception type users see: a one-line message that names the file and the fix."""


class NnsamError(Exception):
    """Bad input or setup. The message is a single line meant for the user."""
