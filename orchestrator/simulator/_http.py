"""A tiny HTTP/1.1 server on anyio streams and h11: keep-alive, chunked streaming, bounded clients.

Bounded: idle keep-alive connections close after a timeout, a request must arrive whole within a
deadline (slowloris), headers and bodies have size limits (431/413), a client that does not read
is dropped, and running out of file descriptors on accept backs off instead of ending the server.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import h11
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup, TaskStatus

__all__ = ("HttpLimits", "HttpServer", "Request", "Response", "StreamingResponse", "json_response")

log = structlog.get_logger(__name__)


@dataclass
class Request:
    """One parsed request."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    """A complete response; ``truncate`` closes the connection after half the body (a fault)."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"
    truncate: bool = False


@dataclass
class StreamingResponse:
    """A chunked response whose body comes from an async iterator; ``abort`` drops the connection."""

    chunks: AsyncIterator[bytes]
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "text/event-stream"


def json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    """Serialize ``payload`` as the JSON body."""
    return Response(status, json.dumps(payload, separators=(",", ":")).encode(), headers or [])


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class DropConnection(Exception):
    """Raised by a streaming body to close the socket without finishing the response."""


Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]


@dataclass(frozen=True)
class HttpLimits:
    """What one connection may cost the server: time while idle or sending, and bytes per request."""

    idle_timeout_s: float = 5.0  # uvicorn's keep-alive default, which vLLM inherits
    request_timeout_s: float = 30.0  # from a request's first byte to its last (slowloris)
    send_timeout_s: float = 60.0  # one write to a client that does not read
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 64 * 1024


class _Reject(Exception):
    """A request the server answers itself, then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Running out of descriptors (or kernel memory) on accept is transient: the pending connection
# stays in the backlog, so retrying at once would spin. Back off instead, as asyncio's own
# servers do, and keep serving the connections already open.
_ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.ECONNRESET, errno.ENOTCONN, errno.EINVAL, errno.EPROTO,
                                      errno.EINTR, errno.EAGAIN})  # about one connection, not the server
_ACCEPT_BACKOFF_S = (0.05, 1.0)


class HttpServer:
    """Serves ``handler`` on host:port until cancelled."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0,
                 limits: HttpLimits | None = None) -> None:
        self._handler = handler
        self.host = host
        self.port = port
        self.limits = limits or HttpLimits()
        self.accept_failures = 0
        self.connections_open = 0

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the bound port through ``task_status``, then serve forever."""
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port, backlog=4096)
        self.port = listener.extra(SocketAttribute.local_port)
        task_status.started(self.port)
        async with listener, anyio.create_task_group() as tg:
            for one in listener.listeners:
                assert isinstance(one, SocketListener)  # what create_tcp_listener makes
                tg.start_soon(self._accept_loop, one, tg)

    async def _accept_loop(self, listener: SocketListener, tg: TaskGroup) -> None:
        backoff = _ACCEPT_BACKOFF_S[0]
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                code = cause.errno if isinstance(cause, OSError) else None
                if code in _ACCEPT_TRANSIENT_ERRNOS:
                    continue  # e.g. the peer reset before the accept completed
                self.accept_failures += 1
                level = log.warning if code in _ACCEPT_RESOURCE_ERRNOS else log.error  # unknown: back off too
                level("sim_accept_failed", error=os.strerror(code) if code else repr(exc), errno=code,
                      retry_in_s=backoff, connections_open=self.connections_open, failures=self.accept_failures)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _ACCEPT_BACKOFF_S[1])
                continue
            backoff = _ACCEPT_BACKOFF_S[0]
            tg.start_soon(self._connection, stream)

    async def _connection(self, stream: SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        self.connections_open += 1
        async with stream:
            try:
                while True:
                    try:
                        request = await self._read(conn, stream)
                    except _Reject as exc:
                        await self._send(stream, _raw_error(exc.status, str(exc)))
                        return
                    if request is None:
                        return
                    try:
                        response = await self._handler(request)
                    except Exception:
                        log.exception("sim_handler_failed", path=request.path)
                        response = json_response(500, {"error": {"message": "simulator bug", "type":
                                                                 "InternalServerError", "param": None, "code": 500}})
                    if not await self._write(conn, stream, response):
                        return
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
            except (anyio.BrokenResourceError, anyio.EndOfStream, anyio.ClosedResourceError, h11.ProtocolError,
                    ConnectionError, TimeoutError):
                return
            finally:
                self.connections_open -= 1

    @staticmethod
    async def _receive(stream: SocketStream) -> bytes:
        try:
            return await stream.receive(65536)
        except anyio.EndOfStream:
            return b""

    async def _read(self, conn: h11.Connection, stream: SocketStream) -> Request | None:
        """The next request; ``None`` when the client closed, stayed idle or was too slow to send one."""
        head: h11.Request | None = None
        body = bytearray()
        deadline: float | None = None  # set by a request's first bytes
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Reject(exc.error_status_hint, str(exc) or "Invalid HTTP request received.") from exc
            if event is h11.NEED_DATA:
                wait = self.limits.idle_timeout_s if deadline is None else deadline - anyio.current_time()
                data = None
                with anyio.move_on_after(max(wait, 0.0)):
                    data = await self._receive(stream)
                if data is None:
                    log.debug("sim_connection_closed", reason="idle" if deadline is None else "request too slow")
                    return None
                if deadline is None and data:
                    deadline = anyio.current_time() + self.limits.request_timeout_s
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
                if deadline is None:  # a pipelined request, already buffered
                    deadline = anyio.current_time() + self.limits.request_timeout_s
                length = dict(event.headers).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
                    raise _Reject(413, f"Request body larger than {self.limits.max_body_bytes} bytes.")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body_bytes:
                    raise _Reject(413, f"Request body larger than {self.limits.max_body_bytes} bytes.")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
                return Request(head.method.decode(), path, query, headers, bytes(body))
            else:  # ConnectionClosed or PAUSED
                return None

    async def _send(self, stream: SocketStream, data: bytes) -> None:
        """Write ``data``; a client that does not take it within the send timeout raises ``TimeoutError``."""
        if data:
            with anyio.fail_after(self.limits.send_timeout_s):
                await stream.send(data)

    async def _write(self, conn: h11.Connection, stream: SocketStream, response: Response | StreamingResponse) -> bool:
        headers = [("content-type", response.content_type), ("server", "orchestrator-simulator"),
                   *response.headers]
        if isinstance(response, Response):
            headers.append(("content-length", str(len(response.body))))
            await self._send(stream, conn.send(h11.Response(status_code=response.status, headers=headers,
                                                            reason=_reason(response.status))) or b"")
            if response.truncate:
                await self._send(stream, conn.send(h11.Data(data=response.body[: len(response.body) // 2])) or b"")
                return False
            await self._send(stream, (conn.send(h11.Data(data=response.body)) or b"")
                             + (conn.send(h11.EndOfMessage()) or b""))
            return True
        await self._send(stream, conn.send(h11.Response(status_code=response.status, headers=headers,
                                                        reason=_reason(response.status))) or b"")
        chunks = response.chunks
        try:
            async for chunk in chunks:
                await self._send(stream, conn.send(h11.Data(data=chunk)) or b"")
        except DropConnection:
            return False
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        await self._send(stream, conn.send(h11.EndOfMessage()) or b"")
        return True


def _raw_error(status: int, message: str) -> bytes:
    """A complete ``Connection: close`` error response, written without h11 (whose state may be ERROR)."""
    body = json.dumps({"error": {"message": message, "type": _reason(status).decode() or "Error", "param": None,
                                 "code": status}}).encode()
    return (f"HTTP/1.1 {status} {_reason(status).decode()}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\nserver: orchestrator-simulator\r\n"
            "x-simulated: true\r\n\r\n").encode() + body
