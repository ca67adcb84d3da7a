"""`apserve serve`: the app on uvicorn, with a graceful drain on SIGTERM.

First SIGTERM (or SIGINT): readiness turns false and new requests get 503 at once, every admitted request
is still computed and answered, then uvicorn closes and the process exits 0. A second signal forces exit.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from model_store.artifact import ArtifactError
from server.app import Runtime, create_app
from server.settings import SettingsError, load_settings
from server.transport import CoalescingHttpToolsProtocol

log = logging.getLogger("apserve.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime = getattr(self.app.state, "runtime", None)
        if self._draining or self._loop is None or runtime is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        loop = self._loop
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(runtime)))

    async def _drain(self, runtime: Runtime) -> None:
        runtime.draining = True
        runtime.scheduler.close()
        log.info("draining: %d queued requests", runtime.scheduler.queue_depth)
        if runtime.settings.shutdown_grace_s:
            await asyncio.sleep(runtime.settings.shutdown_grace_s)
        await runtime.scheduler.drain()
        log.info("drained; shutting down")
        self.should_exit = True


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            args.config,
            model_path=args.model,
            host=args.host,
            port=args.port,
            policy=args.policy,
        )
        app = create_app(settings)
    except (SettingsError, ArtifactError) as exc:
        print(f"apserve serve: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # apserve logs no client address, so rewriting it from X-Forwarded-* headers (uvicorn's
        # ProxyHeadersMiddleware, on by default around every request) would be ~10 µs per request for nothing
        proxy_headers=False,
        timeout_graceful_shutdown=None,
        http=CoalescingHttpToolsProtocol,  # a response in one send (server/transport.py)
    )
    # Everything loaded so far (libraries, the model, warmed sessions) lives as long as the process. Left
    # in the collector's generations, every full collection scans it all: ~50-200 ms on this kind of
    # core with the event loop stopped, about once a second under load — a deadline miss for every
    # request in flight. Frozen, a full collection only scans what serving allocates.
    gc.freeze()
    server = DrainingServer(config, app)
    server.run()
    return 0 if server.started else 1
