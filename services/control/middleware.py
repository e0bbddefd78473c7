"""ASGI middleware: a request body limit (413) and deadline (408), the HTTP latency histogram and the count
of requests in flight."""

from __future__ import annotations

import asyncio
import time

from services.control.errors import error_response


class BodyLimit:
    """Read at most `max_bytes` of a request body before the app sees it, answering 413 beyond; the whole
    body must arrive within `timeout_s` of its headers, else 408 (a client that trickles a body, or
    declares more than it sends, does not hold a request open)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        deadline = time.monotonic() + self.timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await self._too_slow(scope, receive, send)
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        limit = self.max_bytes
        await error_response(413, f"request body exceeds {limit} bytes", {"limit": limit})(scope, receive, send)

    async def _too_slow(self, scope, receive, send):
        limit = self.timeout_s
        message = f"the request body did not arrive within {limit:g} s (--body-timeout)"
        response = error_response(408, message, {"limit_s": limit}, {"Connection": "close"})
        await response(scope, receive, send)


class RequestTimer:
    """Observe every request's latency, labelled by method, route template and status, and count the
    requests in flight (`in_flight`, a gauge)."""

    def __init__(self, app, histogram, in_flight=None):
        self.app, self.histogram, self.in_flight = app, histogram, in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        start = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if self.in_flight is not None:
            self.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if self.in_flight is not None:
                self.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            self.histogram.labels(scope["method"], route, str(status)).observe(time.perf_counter() - start)
