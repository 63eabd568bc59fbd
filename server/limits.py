"""How much and how fast a client must send: a body over --max-request-bytes is refused with
413 before it is read, and a request whose head or body takes longer than --request-timeout
to arrive is cut off (408 once the head is in, else the connection is closed).

uvicorn has no deadline for a request's head, so a client that opens connections and
stalls halfway would hold them forever; `timed_h11_protocol` adds one.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from moestream.server.errors import APIError

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # a 128k-token prompt, JSON-escaped, fits with room
DEFAULT_REQUEST_TIMEOUT_S = 30.0


class BodyGuard:
    """ASGI middleware: reads a request's body within the size and time bounds, then hands
    it to the app in one piece."""

    def __init__(self, app, max_request_bytes: int, request_timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_request_bytes, request_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large().response(close=True)(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            error = APIError(f"the request body did not arrive within {self.timeout_s:g} s",
                             status=408, code="request_timeout")
            await error.response(close=True)(scope, receive, send)
            return
        if body is None:  # the client left
            return
        if len(body) > self.max_bytes:
            await self._too_large().response(close=True)(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed, body
            if replayed:
                return await receive()  # after the body: wait for the client to leave
            replayed = True
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or its first part past the limit; None if the client hung up."""
        chunks, size = [], 0
        while size <= self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(f"the request body is larger than {self.max_bytes} bytes (the server's "
                        "--max-request-bytes)", status=413, code="request_too_large")


def timed_h11_protocol(request_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request head takes longer
    than `request_timeout_s` to arrive (counted from the connection or the last response)."""

    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head arrived: the body has BodyGuard's bound
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # first: a pipelined request that starts now disarms it again
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(request_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            in_request = self.cycle is not None and not self.cycle.response_complete
            if not in_request and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol
