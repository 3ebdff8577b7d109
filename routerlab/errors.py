"""Errors that the CLI turns into one line and exit code 2."""


class ConfigError(ValueError):
    """Bad input from the user: a config value, a name, a file. The message says what is valid."""
