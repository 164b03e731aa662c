"""The one exception type that reaches users as a single clear line."""


class HdmapError(Exception):
    """A problem with the user's input or configuration.

    The CLI prints ``error: <message>`` on one line and exits with status 2; no traceback.
    The message must name the offending file, folder or parameter and say what is wrong.
    """
