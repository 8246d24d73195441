"""Running ``grpc.aio`` servers from code that is otherwise synchronous.

Block servers and the registry serve with ``grpc.aio`` (an idle stream is a suspended coroutine,
not a blocked thread); their lifecycles (start, announce, stop) stay plain threads and calls.
gRPC's asyncio support works with one event loop per process, so every aio server of a process runs
on one shared loop thread, started when the first server starts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc

from fincluster.errors import ConfigurationError

T = TypeVar("T")

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _shared_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None or not _loop.is_running():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=run, name="grpc-aio", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def run_on_loop(coroutine: Coroutine[Any, Any, T], *, timeout: float) -> T:
    """Run ``coroutine`` on the shared loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, _shared_loop()).result(timeout=timeout)


class AioServerThread:
    """One ``grpc.aio.Server`` on the process's shared event loop."""

    def __init__(
        self,
        register: Callable[[grpc.aio.Server], None],
        *,
        address: str,
        credentials: grpc.ServerCredentials,
        options: Sequence[tuple[str, object]] = (),
        name: str = "grpc-aio",
    ) -> None:
        """``register`` adds the servicers (``add_XServicer_to_server``); ``address`` is host:port."""
        self._register = register
        self._address = address
        self._credentials = credentials
        self._options = list(options)
        self.name = name
        self._server: grpc.aio.Server | None = None
        self._stopped = threading.Event()

    def start(self) -> int:
        """Bind and serve; returns the bound port."""

        async def start() -> int:
            server = grpc.aio.server(options=self._options)
            self._register(server)
            port: int = server.add_secure_port(self._address, self._credentials)
            await server.start()
            self._server = server
            return port

        try:
            port = run_on_loop(start(), timeout=30)
        except RuntimeError as error:  # gRPC says so when it cannot bind the address
            raise ConfigurationError(f"cannot listen on {self._address}: {error}") from None
        if port == 0:
            raise ConfigurationError(
                f"cannot listen on {self._address}: in use or not an address of this host"
            )
        return port

    def stop(self, grace_seconds: float) -> None:
        """Refuse new calls, let running ones finish for ``grace_seconds``, then cancel the rest."""
        server = self._server
        if server is None or self._stopped.is_set():
            return
        run_on_loop(server.stop(grace_seconds), timeout=grace_seconds + 30)
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()
