"""server/transport.py: a response's writes leave in one send, in order, and nothing written is lost."""

from __future__ import annotations

import asyncio
import socket

import pytest

from server.transport import CoalescingHttpToolsProtocol, CoalescingTransport


class RecordingTransport(asyncio.Transport):
    """What reaches the socket: one entry per write."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0


async def _next_step() -> None:
    await asyncio.sleep(0)


def test_writes_in_one_loop_step_leave_as_one_send_in_order() -> None:
    async def scenario() -> list[bytes]:
        inner = RecordingTransport()
        coalescing = CoalescingTransport(inner, asyncio.get_running_loop())
        coalescing.write(b"HTTP/1.1 200 OK\r\n\r\n")
        coalescing.write(memoryview(b"body"))
        assert inner.sent == [] and coalescing.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nbody")
        await _next_step()
        coalescing.writelines([b"second ", b"response"])
        await _next_step()
        return inner.sent

    assert asyncio.run(scenario()) == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"second response"]


def test_close_sends_what_was_written_and_abort_drops_it() -> None:
    async def scenario() -> tuple[RecordingTransport, RecordingTransport]:
        loop = asyncio.get_running_loop()
        closed, aborted = RecordingTransport(), RecordingTransport()
        first = CoalescingTransport(closed, loop)
        first.write(b"bye")
        first.close()
        second = CoalescingTransport(aborted, loop)
        second.write(b"never")
        second.abort()
        await _next_step()  # the flushes scheduled by the writes run: nothing is left to send
        return closed, aborted

    closed, aborted = asyncio.run(scenario())
    assert closed.sent == [b"bye"] and closed.closed
    assert aborted.sent == [] and aborted.aborted


def test_writes_to_a_closing_transport_are_dropped_and_other_calls_pass_through() -> None:
    async def scenario() -> tuple[list[bytes], bool]:
        inner = RecordingTransport()
        coalescing = CoalescingTransport(inner, asyncio.get_running_loop())
        coalescing.write(b"too late")
        inner.closed = True  # the peer went away before the step ended
        await _next_step()
        return inner.sent, coalescing.is_closing()

    assert asyncio.run(scenario()) == ([], True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_uvicorn_serves_keep_alive_requests_through_the_protocol(loop: str) -> None:
    """The protocol class in a real uvicorn server, on either event loop uvicorn may pick: several requests
    on one connection, each answered whole."""
    import uvicorn
    import uvloop

    async def app(scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        body = scope["path"].encode() * 1000
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    async def scenario() -> list[tuple[int, bool]]:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, http=CoalescingHttpToolsProtocol, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # one keep-alive connection
            replies = []
            for i in range(5):
                writer.write(f"GET /r{i} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                replies.append((int(head[9:12]), body == f"/r{i}".encode() * 1000))
            writer.close()
            return replies
        finally:
            server.should_exit = True
            await task

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(scenario()) == [(200, True)] * 5
