"""Run an ASGI app inside this process, one HTTP request at a time as a stream of messages (issue 16).

A Ray Serve replica holds the whole `looplm serve` app (its engine thread, metrics, errors, streaming) and
answers requests that arrive as plain data through a deployment handle, not as sockets: `AppRunner` runs
the app's lifespan once and each request through the ASGI protocol, yielding what the app sends. When the
consumer stops reading (its client went away), the app sees `http.disconnect`, as under uvicorn, and
aborts the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class AppRunner:
    def __init__(self, app):
        self.app = app
        self._lifespan: asyncio.Task | None = None
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()

    async def startup(self) -> None:
        async def receive():
            return await self._to_app.get()

        async def send(message):
            await self._from_app.put(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._lifespan = asyncio.create_task(self.app(scope, receive, send))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app did not start: {message.get('message', message)}")

    async def shutdown(self) -> None:
        if self._lifespan is None:
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()
        self._lifespan = None

    async def request(self, method: str, path: str, *, query: str = "", headers: list[tuple[str, str]] = (),
                      body: bytes = b"") -> AsyncIterator[dict]:
        """The app's messages for one request: http.response.start, then http.response.body ones."""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method.upper(), "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": query.encode(), "root_path": "", "client": ("127.0.0.1", 0),
                 "server": ("127.0.0.1", 0), "state": {},
                 "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await out.put(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        try:
            while True:
                get = asyncio.ensure_future(out.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the app returned (or raised) with nothing more queued
                    get.cancel()
                    task.result()
                    while not out.empty():
                        yield out.get_nowait()
                    return
                message = get.result()
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
        finally:
            gone.set()  # a consumer that stopped early: the app sees the client go
            try:
                await asyncio.wait_for(task, timeout=30)
            except Exception:  # noqa: BLE001 — the app's own error handling has answered or logged it
                pass
