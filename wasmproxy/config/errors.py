"""ConfigError: every config failure, with the field path that caused it."""

from __future__ import annotations


class ConfigError(Exception):
    """A rejected configuration. ``str()`` is ``"<field path>: <message>"`` (or just the message
    when no single field is to blame), so the CLI prints it as is."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)
