"""Connection hygiene: a client that opens a connection and then goes quiet is dropped, not held forever.

uvicorn times out idle keep-alive connections, but not a connection whose request headers never finish, nor a
request whose body stops arriving. `guarded_protocol` closes a connection whose request headers are not complete
within `header_timeout_s` of connecting (or of the previous response); `BodyTimeout` answers 408 when a request's
body stalls for `body_timeout_s`. The number of connections is capped by uvicorn's `limit_concurrency` (503).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, dropping connections whose request headers take longer than `header_timeout_s`."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle and self._header_timer is not None:  # a request's headers are complete
                self._header_timer.cancel()
                self._header_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets the same time for its headers

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._drop_if_waiting)

        def _drop_if_waiting(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return GuardedH11Protocol


class BodyTimeout:
    """ASGI middleware: a request body that stops arriving for `seconds` fails; whatever the app answers then
    (FastAPI: 400, "error parsing the body") goes out as 408 and the connection closes."""

    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_done, timed_out = False, False

        async def timed_receive():
            nonlocal body_done, timed_out
            if body_done:  # after the body, the app only waits for a disconnect: no deadline then
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.seconds)
            except asyncio.TimeoutError:
                timed_out = True
                raise
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def relabelling_send(message) -> None:
            if timed_out and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "status": 408, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, timed_receive, relabelling_send)
