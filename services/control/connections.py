"""The control service's HTTP connections: uvicorn's httptools protocol with the limits uvicorn lacks, so
that slow or greedy clients cannot take the service down.

- Header timeout: a request's headers must be complete within `header_timeout_s` of the connection opening or
  of the previous response on it. A client that sent part of a request and stalls (slowloris) is answered
  408 and closed; one that sent nothing is closed. (uvicorn's own keep-alive timeout only covers a connection
  that sent nothing after a response; any byte of a next request cancels it, and a new connection has none.)
- Header size: a request line and headers larger than `max_header_bytes` are answered 431 and the
  connection closed (the httptools parser itself would take them without bound). Each read of a head counts
  whole, except one where a pipelined request's head begins after the previous message ended: there the
  request line and complete headers count (the parser gives no offsets), so that the previous message's
  bytes are not taken for head bytes; the limit then holds to within that one read's unfinished header.
- Connection limit: at most `max_connections` are open. A connection beyond that closes the one that has been
  waiting for a request the longest; when every open connection has a request in flight, the new one is
  answered 503 and closed. Idle connections thus cannot use up the process's file descriptors: a new client
  (a /healthz probe) always gets a connection while some are idle.

Each of these errors is answered in the API's error shape; the connection is then half-closed and what the
client still sends is dropped for up to LINGER_S before it closes, so that the answer arrives.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.control.errors import CODES

# After an error answer the connection is half-closed and what the client still sends is read and dropped for
# up to this long, so that the answer is not lost to a reset (closing a socket with unread input resets it).
LINGER_S = 2.0


# Why the service closes a connection: the `reason` label of atomo_control_http_connections_closed_total.
CLOSE_REASONS = ("header_timeout", "header_too_large", "evicted", "refused")


@dataclass
class ConnectionLimits:
    """What `atomo serve --header-timeout --max-connections --max-header-bytes` sets; `metrics`, when given, holds the
    `atomo_control_http_connections` gauge and the `atomo_control_http_connections_closed_total` counter."""

    header_timeout_s: float = 10.0
    max_connections: int = 512
    max_header_bytes: int = 64 << 10
    metrics: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.metrics is not None:  # every reason's series exists from the start (at 0), so rate() has data
            for reason in CLOSE_REASONS:
                self.metrics["atomo_control_http_connections_closed_total"].labels(reason=reason)

    def closed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics["atomo_control_http_connections_closed_total"].labels(reason=reason).inc()

    def opened(self, delta: int) -> None:
        if self.metrics is not None:
            self.metrics["atomo_control_http_connections"].inc(delta)


def _raw_error(status: int, phrase: str, message: str, details: dict, headers: str = "") -> bytes:
    """A complete HTTP/1.1 response in the API's error shape, that closes the connection."""
    error = {"code": CODES[status], "message": message, "details": details}
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{headers}\r\n"
    )
    return head.encode("ascii") + body


def protocol_class(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """A uvicorn HTTP protocol class (`uvicorn.Config(http=...)`) that enforces `limits`."""

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._header_timer = None
            self._waiting_since: float | None = None  # when it began waiting for a request's headers
            self._waiting_cycle = None  # the request cycle current then: a new one means headers arrived
            self._partial = False  # bytes of the awaited request have arrived
            self._header_bytes: int | None = None  # bytes received in a request's head so far; None: not in one
            self._after_message = False  # a request's message ended in the chunk being parsed
            self._fields_only = False  # this chunk's head bytes are counted from the parser's fields
            self._counted = False
            self._lingering = False  # an error was answered: input is dropped until the connection closes
            self._linger_timer = None

        # The wait for a request: from the connection or the previous response to the next headers.

        def _await_request(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._waiting_since, self._waiting_cycle, self._partial = time.monotonic(), self.cycle, False
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def waiting(self) -> bool:
            """No request in flight: waiting for (the rest of) a request's headers, or lingering."""
            return self._lingering or (
                self._waiting_since is not None
                and self.cycle is self._waiting_cycle
                and not self.pipeline
                and self.transport is not None
                and not self.transport.is_closing()
            )

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self._lingering or not self.waiting():
                return
            limits.closed("header_timeout")
            if self._partial:
                limit = limits.header_timeout_s
                message = f"the request's headers did not arrive within {limit:g} s (--header-timeout)"
                self._shut(_raw_error(408, "Request Timeout", message, {"limit_s": limit}))
            else:  # nothing was asked: close quietly, like an expired keep-alive
                self._shut()

        def _shut(self, response: bytes | None = None) -> None:
            """Close now, or after sending `response` and LINGER_S of dropping what the client still sends;
            a client that does not read its answer does not keep the descriptor."""
            if response is not None and not self._lingering and self.transport.can_write_eof():
                self.transport.write(response)
                self.transport.write_eof()
                self._lingering = True
                self._linger_timer = self.loop.call_later(LINGER_S, self._shut)
                return
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()

        # uvicorn's protocol callbacks

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._counted = True
            limits.opened(1)
            if len(self.connections) > limits.max_connections and not self._make_room():
                limits.closed("refused")
                n = limits.max_connections
                message = f"the service has {n} connections open, each with a request in flight (--max-connections)"
                self._shut(_raw_error(503, "Service Unavailable", message, {"limit": n}, "retry-after: 1\r\n"))
                return
            self._await_request()

        def _make_room(self) -> bool:
            """Close the connection that has waited longest for a request, if the open ones exceed the limit;
            False when all of them have a request in flight."""
            open_ = [c for c in self.connections if c.transport is not None and not c.transport.is_closing()]
            if len(open_) <= limits.max_connections:
                return True
            idle = [c for c in open_ if c is not self and isinstance(c, LimitedHttpToolsProtocol) and c.waiting()]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c._waiting_since)
            if not oldest._lingering:
                limits.closed("evicted")
            oldest._shut()
            return True

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return
            self._partial = True
            self._after_message = False
            super().data_received(data)
            if self._header_bytes is not None and not self.transport.is_closing():
                if not self._fields_only:  # the head began at this chunk's start, or before it: all of it is head
                    self._header_bytes += len(data)
                self._fields_only = False  # the next chunk is all head until the head ends
                if self._header_bytes > limits.max_header_bytes:
                    limits.closed("header_too_large")
                    n = limits.max_header_bytes
                    message = f"the request line and headers exceed {n} bytes (--max-header-bytes)"
                    self._shut(_raw_error(431, "Request Header Fields Too Large", message, {"limit": n}))

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            # A head that begins after a pipelined message ended in the same chunk counts its request line and
            # complete headers (the parser's callbacks), not the chunk, which holds the message before it.
            self._fields_only = self._after_message

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if self._fields_only and self._header_bytes is not None:
                self._header_bytes += len(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            if self._fields_only and self._header_bytes is not None:
                self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF

        def on_headers_complete(self) -> None:
            self._header_bytes = None
            self._fields_only = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._after_message = True

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._await_request()

        def connection_lost(self, exc) -> None:
            for timer in (self._header_timer, self._linger_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._linger_timer = None
            if self._counted:
                self._counted = False
                limits.opened(-1)
            super().connection_lost(exc)

    return LimitedHttpToolsProtocol
