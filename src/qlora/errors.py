"""The one exception type users see: a message that names the file or option and the fix."""


class QloraError(Exception):
    """Bad input or an impossible request. The CLI prints the message without a traceback."""
