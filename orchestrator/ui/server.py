"""Serve the console with uvicorn inside the caller's event loop, until cancelled."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterator

import anyio
from anyio.abc import TaskStatus

from orchestrator.ui.app import console_app
from orchestrator.ui.auth import Operators
from orchestrator.ui.source import RunSource
from protocol.errors import ConfigError

__all__ = ("ConsoleAddress", "serve_console")


class ConsoleAddress(str):
    """The console's base URL (``http://host:port``), with a login URL per operator."""

    __slots__ = ()

    def login_url(self, token: str) -> str:
        """Where a person opens the console logged in with ``token``."""
        return f"{self}/login?token={token}"


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is served, so a taken port is a clear error at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot serve the console on host {host!r}: {exc}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve the console on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _url(host: str, sock: socket.socket) -> ConsoleAddress:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host
    return ConsoleAddress(f"http://{shown}:{port}")


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def _allowed_hosts(host: str) -> list[str] | None:
    """Loopback names for a console on loopback (DNS rebinding cannot reach it); any name otherwise."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return list(LOOPBACK_NAMES) if loopback else None


async def serve_console(source: RunSource, operators: Operators | None = None, *, host: str = "127.0.0.1",
                        port: int = 8080, ready: Callable[[ConsoleAddress], Awaitable[None]] | None = None,
                        task_status: TaskStatus[ConsoleAddress] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the console until cancelled; ``ready`` (and ``task_status``) get its URL once it listens.

    Port 0 picks a free port. Signals are the caller's business: uvicorn's own handlers stay off.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the CLI handles signals; uvicorn's handlers would take them from it

    sock = _bind(host, port)
    app = console_app(source, operators, allowed_hosts=_allowed_hosts(host))
    config = uvicorn.Config(app, log_config=None, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=1)
    server = _Server(config)
    url = _url(host, sock)

    async def run_server() -> None:
        with anyio.CancelScope(shield=True):  # shut down by should_exit, so connections close cleanly
            try:
                await server.serve(sockets=[sock])
            finally:
                sock.close()
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_server)
        try:
            # The socket listens already: a browser that connects now waits in its backlog until uvicorn serves.
            if ready is not None:
                await ready(url)
            task_status.started(url)
            await anyio.sleep_forever()
        finally:
            app.end_streams()  # or shutdown waits on them, then cancels them mid-response
            server.should_exit = True
