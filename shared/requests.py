"""The id of the client request a piece of work belongs to, carried from hop to hop.

The gateway sets it per HTTP request (``services/gateway/front.py``); every event published
while it is set carries it (``Bus.publish`` stamps ``Event.request_id``), and a consumer sets
it again, and binds it to its log lines, while it handles an event that carries one. So the
log lines of all five services for one request can be found by it.
"""

from __future__ import annotations

import contextvars

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("baton_request_id", default="")


def current() -> str:
    """The request id of the work in hand ("" when there is none)."""
    return REQUEST_ID.get()
