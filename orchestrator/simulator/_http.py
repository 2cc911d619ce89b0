"""A tiny HTTP/1.1 server on anyio streams and h11: keep-alive, chunked streaming, nothing else."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import h11
import structlog
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

__all__ = ("HttpServer", "Request", "Response", "StreamingResponse", "json_response")

log = structlog.get_logger(__name__)

_MAX_BODY = 32 * 1024 * 1024


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


class HttpServer:
    """Serves ``handler`` on host:port until cancelled."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self.host = host
        self.port = port

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the bound port through ``task_status``, then serve forever."""
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port, backlog=4096)
        self.port = listener.extra(SocketAttribute.local_port)
        task_status.started(self.port)
        async with listener:
            await listener.serve(self._connection)

    async def _connection(self, stream: SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        async with stream:
            try:
                while True:
                    request = await self._read(conn, stream)
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
                    ConnectionError):
                return

    async def _read(self, conn: h11.Connection, stream: SocketStream) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    return None
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
                return Request(head.method.decode(), path, query, headers, bytes(body))
            else:  # ConnectionClosed or PAUSED
                return None

    async def _write(self, conn: h11.Connection, stream: SocketStream, response: Response | StreamingResponse) -> bool:
        headers = [("content-type", response.content_type), ("server", "orchestrator-simulator"),
                   *response.headers]
        if isinstance(response, Response):
            headers.append(("content-length", str(len(response.body))))
            await stream.send(conn.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status))))
            if response.truncate:
                await stream.send(conn.send(h11.Data(data=response.body[: len(response.body) // 2])) or b"")
                return False
            await stream.send((conn.send(h11.Data(data=response.body)) or b"") + (conn.send(h11.EndOfMessage()) or b""))
            return True
        await stream.send(conn.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status))))
        chunks = response.chunks
        try:
            async for chunk in chunks:
                await stream.send(conn.send(h11.Data(data=chunk)) or b"")
        except DropConnection:
            return False
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        await stream.send(conn.send(h11.EndOfMessage()) or b"")
        return True
