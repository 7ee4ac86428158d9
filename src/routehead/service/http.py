"""Connection-level protection that FastAPI cannot give: body size and upload time, header time.

- :class:`BodyGuard` (ASGI middleware) refuses a body over ``max_bytes`` with 413 before anything parses it
  (by Content-Length, or by the bytes received so far for chunked uploads), and a body that takes longer than
  ``timeout_s`` to arrive with 408: a client trickling bytes cannot hold a connection and its memory forever.
- :class:`HeaderTimeoutH11Protocol` (a uvicorn protocol) closes a connection whose request line and headers
  are not complete ``header_timeout_s`` after its first byte (or after the connection opened): uvicorn itself
  waits for headers indefinitely.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from routehead.service.config import ServiceSettings
from routehead.service.errors import error_body


class BodyGuard:
    """Reject bodies over ``max_bytes`` (413) or slower than ``timeout_s`` (408) before the app reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    @staticmethod
    async def reject(send: Send, status: int, type_: str, message: str, path: str | None = None) -> None:
        body = json.dumps(error_body(status, type_, message, path)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self.reject(send, 400, "bad_request", "invalid Content-Length header",
                                      path=scope.get("path"))
                    return
        if declared is not None and declared > self.max_bytes:
            await self.reject(send, 413, "payload_too_large", f"request body is {declared} bytes (Content-Length); "
                              f"the limit is max_request_bytes={self.max_bytes}", path=scope.get("path"))
            return
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                await self.reject(send, 408, "request_timeout", f"the request body did not arrive within "
                                  f"{self.timeout_s:g} s (body_timeout_s)", path=scope.get("path"))
                return
            if message["type"] == "http.disconnect":
                return  # the client went away; nobody to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self.reject(send, 413, "payload_too_large", f"request body exceeds max_request_bytes="
                                  f"{self.max_bytes} (received {total} bytes so far)", path=scope.get("path"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client to disconnect

        await self.app(scope, replay, send)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose headers take longer than ``header_timeout_s``.

    The timer runs while h11 waits for a request line and headers (``their_state`` IDLE): armed when the
    connection opens and when a kept-alive connection starts sending its next request, cancelled once a
    request's headers are complete.  An idle kept-alive connection is uvicorn's own keep-alive timeout's job.
    """

    header_timeout_s: float = ServiceSettings.header_timeout_s  # header_timeout_protocol() sets the served one

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            if data:
                self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with this header timeout."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": float(seconds)})
