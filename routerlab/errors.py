"""Errors that the CLI turns into one line and exit code 2."""


class ConfigError(ValueError):
    """Bad input from the user: a config value, a name, a file. The message says what is valid."""


def format_validation_error(err) -> str:
    """One line from a pydantic ValidationError: 'field: problem; field: problem'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class RunStopped(RuntimeError):
    """A run stopped on purpose with a reason the user can act on (a non-finite loss or gradient).
    The CLI prints one line and exits 1; nothing is saved past the last good checkpoint."""
