"""The two error roots of every consumer.

    BatonError
    ├── BadData          never retried: terminated with a reason into the dead-letter stream
    │   └── SchemaError  undecodable or schema-invalid payload, unknown version
    └── Transient        retried later: nak with a bounded delay
        ├── DependencyDown   database, broker or model not reachable right now
        └── RetryLater       a handler asks for redelivery after ``delay`` seconds
    Deferred             not an error: the message is due later (a timer); nak with its delay

Anything else is a bug: logged with its traceback, redelivered until ``max_deliver`` bounds it.
"""

from __future__ import annotations


class BatonError(Exception):
    """Root of baton's own errors."""


class BadData(BatonError):
    """The message can never be handled; retrying would only repeat the failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SchemaError(BadData):
    """The payload does not decode into the schema this consumer expects."""


class Exhausted(BadData):
    """The message came back more often than its consumer's ``max_deliver`` without an outcome:
    each delivery's process died (or lost it) before it could ack, nak or dead-letter it."""


class Transient(BatonError):
    """The message is fine but something it needs is not available now."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class DependencyDown(Transient):
    """A dependency (database, broker, model) did not answer."""


class RetryLater(Transient):
    """The handler wants the message again after a while (e.g. waiting for an earlier event)."""


class Deferred(BatonError):
    """The message is fine and handled in part; hand it back at ``delay`` seconds (a timer)."""

    def __init__(self, reason: str, delay: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class ConfigError(BatonError):
    """A setting is missing or invalid; raised at start, never at run time."""
