"""Connection-level limits for `imp serve` (issue 21): what uvicorn leaves open.

uvicorn gives us, and serve.py sets:
- `timeout_keep_alive`: an idle keep-alive connection is closed (--keep-alive, 5 s);
- `h11_max_incomplete_event_size`: request line + headers at most 16 KiB (a 400 beyond);
- `limit_concurrency`: a request beyond that many connections/tasks gets uvicorn's own 503.

What it lacks, added here:
- a header timeout: with the h11 protocol, a connection that sends nothing, or trickles its
  request line and headers a byte at a time, was held open for ever (uvicorn's keep-alive timer
  stops at the first byte). `GuardedH11` closes a connection whose request line and headers are
  not all there `header_timeout` seconds after it opened or after the first byte of its next
  request (408), and one that trickles the rest of a body its handler never read (GET /health
  with a long Content-Length) `header_timeout` seconds after its response;
- a cap on open connections: one over `max_connections` is answered 503 and closed as soon as
  it is accepted, before it can hold anything;
- `BodyBudget`: the request bodies held in memory at once, over all connections (20 clients
  each sending just under --max-body added 920 MB): a body that would take the total over the
  budget is refused with 503 and Retry-After, before it is read.
The body's own deadline (--body-timeout, a 408) is in serve.py's body reader.
"""

from __future__ import annotations

import json

from .api_errors import ApiError

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 60.0
KEEP_ALIVE = 5.0
MAX_CONNECTIONS = 64
MAX_HEADER_BYTES = 16 * 1024


def _raw_response(status: int, reason: str, message: str, code: str, retry_after: int | None = None) -> bytes:
    """An OpenAI-shaped error written straight to a connection no handler has (ApiError's body)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps(ApiError(status, message, kind, code).body()).encode()
    extra = f"retry-after: {retry_after}\r\n" if retry_after else ""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n").encode() + body


def guarded_h11(header_timeout: float, max_connections: int, on_drop=lambda why: None):
    """An h11 protocol class for uvicorn.Config(http=...) with the header timeout and the
    connection cap. `on_drop(why)` is told of each connection it closes (the server's log)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _header_timer = None
        _refused = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._refused = True
                on_drop("too many connections")
                transport.write(_raw_response(503, "Service Unavailable",
                                              f"the server holds {max_connections} connections already "
                                              "(imp serve --max-connections): retry later", "too_many_connections", 1))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._header_timer is None and self._waiting() == "headers":
                self._arm()  # the first bytes of a new request on a kept-alive connection
            super().data_received(data)
            if self._waiting() is None:
                self._disarm()  # a request's line and headers are in: the handler has it now

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._waiting() == "drain":
                if self._header_timer is None:
                    self._arm()  # answered before its body was read: the rest must come in time too
            else:
                self._disarm()  # idle: uvicorn's keep-alive timer runs until the next byte, ours from then

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting(self) -> str | None:
            """What the connection waits for from the client while no handler reads from it:
            a request's line and headers, or the rest of a body its handler did not read."""
            idle = self.cycle is None or self.cycle.response_complete
            if not idle:
                return None
            if self.conn.their_state is h11.IDLE:
                return "headers"
            if self.conn.their_state is h11.SEND_BODY:
                return "drain"
            return None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _late(self) -> None:
            self._header_timer = None
            waiting = self._waiting()
            if self.transport.is_closing() or waiting is None:
                return
            if waiting == "headers":
                on_drop("request headers not received in time")
                self.transport.write(_raw_response(408, "Request Timeout",
                                                   f"the request's headers did not arrive within {header_timeout:g} s "
                                                   "(imp serve --header-timeout)", "request_timeout"))
            else:
                on_drop("the rest of an answered request's body not received in time")
            self.transport.close()

    return GuardedH11


class BodyBudget:
    """Bytes of request bodies held at once, over all requests (used on the event loop only)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held = max(0, self.held - n)
