"""The one exception type for problems the user can fix (bad input, missing model, wrong file)."""


class SoftPromptError(Exception):
    """A user-facing error: the CLI prints its message without a traceback."""
