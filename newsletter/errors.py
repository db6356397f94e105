"""The one exception tree of newsletter.

Every error the package raises on purpose derives from NewsletterError, so the CLI can turn
any of them into one clear line and a non-zero exit::

    NewsletterError
    ├── ConfigError            a setting is missing or invalid (names the key)
    ├── ContentError           an issue file is invalid (names file, line, field)
    ├── HeaderInjectionError   user text that would reach a mail header holds CR, LF, NUL or
    │                          an encoded-word (also a ValueError, so validators can raise it)
    ├── RenderError            a template failed (undefined variable, syntax error)
    ├── StoreError             the database refused an operation
    │   ├── NotFoundError      a list, subscriber or campaign does not exist
    │   └── ConflictError      the operation contradicts what is stored (already sent, ...)
    ├── ImportFileError        a subscriber file cannot be read at all (bad rows are reported,
    │                          not raised)
    ├── FilterSyntaxError      a segment filter does not parse (carries the error's position)
    ├── ArchiveExportError     (archive.py) a static archive cannot be written as asked
    ├── AuthError              an API request has no valid token, or its role may not do that
    └── DeliveryError          one message could not be delivered
        ├── TemporaryDeliveryError   4xx, connection dropped, timeout: may be retried
        │   └── RelayError           the relay itself failed (connect, TLS, auth, MAIL FROM)
        ├── PermanentDeliveryError   5xx: retrying will not help
        └── UnknownOutcomeError      the message may or may not have been accepted
"""

from __future__ import annotations


class NewsletterError(Exception):
    """Base of every error raised on purpose by this package."""


class ConfigError(NewsletterError):
    """A setting is missing or invalid."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"setting {key}: {problem}")


class ContentError(NewsletterError):
    """An issue file is invalid; carries where, so the editor can fix it."""

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        where = path or "<issue>"
        if line is not None:
            where += f":{line}"
        if field:
            where += f": {field}"
        super().__init__(f"{where}: {message}")


class HeaderInjectionError(NewsletterError, ValueError):
    """Text bound for a mail header holds characters that could forge header lines."""


class RenderError(NewsletterError):
    """A template could not be rendered."""


class StoreError(NewsletterError):
    """The store refused an operation."""


class NotFoundError(StoreError):
    """A list, subscriber or campaign does not exist."""


class ConflictError(StoreError):
    """The operation contradicts what is stored."""


class ImportFileError(NewsletterError):
    """A subscriber file cannot be read at all."""


class FilterSyntaxError(NewsletterError, ValueError):
    """A segment filter is invalid; `position` is the 0-based offset of the problem in
    `text`, so a caret can point at it."""

    def __init__(self, message: str, *, text: str, position: int) -> None:
        self.message = message
        self.text = text
        self.position = position
        super().__init__(f"invalid filter at position {position + 1}: {message}")

    def pointer(self) -> str:
        """The filter and a caret under the problem, for a terminal."""
        return f"{self.text}\n{' ' * self.position}^"


class AuthError(NewsletterError):
    """An API request is not authenticated (401) or not allowed for its role (403)."""

    def __init__(self, message: str, *, status: int = 401) -> None:
        self.status = status
        super().__init__(message)


class DeliveryError(NewsletterError):
    """One message could not be delivered; `code` is the SMTP reply code if there was one."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        self.code = code
        super().__init__(f"{code} {message}" if code else message)


class TemporaryDeliveryError(DeliveryError):
    """A failure that may go away: 4xx replies, dropped connections, timeouts."""


class RelayError(TemporaryDeliveryError):
    """The relay, not the recipient, failed: many in a row stop the run instead of the list."""


class PermanentDeliveryError(DeliveryError):
    """A failure that will not go away by retrying: 5xx replies."""


class UnknownOutcomeError(DeliveryError):
    """The whole message was handed over but no reply came: it may have been accepted."""
