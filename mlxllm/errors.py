"""The one exception users see as a message, never as a traceback."""


class MlxllmError(Exception):
    """A problem with the user's input or environment, with what to do about it."""
