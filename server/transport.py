"""uvicorn's httptools protocol with each response leaving in one send.

uvicorn writes a response's status line and headers (``http.response.start``) and its body
(``http.response.body``) as two ``transport.write`` calls, and uvloop sends each at once: two system calls
and two TCP segments per response, and on a VM a second wake-up of the reader. Here the writes made in
one event-loop step are joined, and sent as soon as the response is complete (uvicorn's
``on_response_complete``), or else at the end of that step. A response's two writes happen in the same
step (nothing awaits between them unless the socket's buffer is full, and then uvicorn waits for it to
drain, which the joined data also respects). With the rest of session 11's changes, refusals (no
engine work) went from 180-193 to 127-148 µs of event-loop CPU per request on this VM
(bench/bench_front_end.py, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes in one loop step go out as one. Everything else is the wrapped one's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._pending)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()  # what was written before close() still goes out, as with any transport
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, ...
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=...)``: the httptools protocol over a ``CoalescingTransport``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, only alike)
        super().connection_made(CoalescingTransport(cast(asyncio.Transport, transport), self.loop))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        # The response is whole: send it now rather than behind whatever the loop has queued meanwhile
        # (at low load, the accounting of the batch that computed it).
        if isinstance(self.transport, CoalescingTransport):
            self.transport.flush()
        super().on_response_complete()
