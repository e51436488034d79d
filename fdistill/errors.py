"""The one exception a user's mistake raises: the entry points print its message as one ``error:`` line and exit
with code 2."""


class ConfigError(ValueError):
    """A problem with the user's configuration or inputs; its message is one line that names the fix."""
