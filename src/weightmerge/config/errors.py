"""The one error type of every config weightmerge reads (merge configs, eval configs)."""

from __future__ import annotations

MAX_MESSAGE = 2000


class ConfigError(ValueError):
    """A config the user must fix. ``str()`` is one line: ``FILE: LOCATION: MESSAGE``."""

    def __init__(self, message: str, *, location: str = "", source: str | None = None) -> None:
        self.message = " ".join(message.split())  # always one line
        if len(self.message) > MAX_MESSAGE:  # values quoted in messages are untrusted in size
            self.message = self.message[: MAX_MESSAGE - 3] + "..."
        self.location = location
        self.source = source
        super().__init__(self._text())

    def _text(self) -> str:
        return ": ".join(p for p in (self.source, self.location, self.message) if p)

    def with_source(self, source: str | None) -> ConfigError:
        return ConfigError(self.message, location=self.location, source=source)
