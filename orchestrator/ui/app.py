"""The console's ASGI app: a static page, a JSON API, a server-sent event stream per run, and actions.

Security, in one place:
- Read-only without a session: every GET is open to whoever reaches the port (bind it to
  loopback, the default, or put it behind your own access control); every action needs a session.
- A session comes from an operator's login token (``/login?token=...``) and lives in an HttpOnly,
  SameSite=Strict cookie; an action also needs the session's CSRF token in ``X-CSRF-Token`` and,
  when the browser sends one, an ``Origin`` of this very host.
- Everything the page shows came from workers and models: the page sets it as text only, and the
  Content-Security-Policy allows scripts and styles from this origin alone (no inline code).
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from importlib import resources
from typing import Any, cast
from urllib.parse import urlsplit

import anyio
from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.following import history_length
from orchestrator.processes import UnknownRun
from orchestrator.ui.auth import Operators, Sessions
from orchestrator.ui.source import RunSource
from orchestrator.ui.view import TASK_ACTIONS, RunPage, page_from_status
from protocol.errors import BusError, ConfigError
from protocol.history import RunFinished
from protocol.messages import OverrideAction

__all__ = ("SESSION_COOKIE", "ConsoleApp", "console_app")

SESSION_COOKIE = "orch_session"
CSRF_HEADER = "x-csrf-token"
MAX_FEEDBACK = 20_000  # characters; a person's feedback, not a document
MAX_BODY = 64 * 1024
KEEPALIVE_S = 10.0  # how long one blocking read of a run's history waits before a keep-alive line

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the login URL carries a token: never send it on
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}


def _static(name: str) -> bytes:
    return (resources.files("orchestrator.ui") / "static" / name).read_bytes()


class _SecurityHeaders:
    """Adds the CSP and friends to every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


class _EventStream(StreamingResponse):
    """An event stream the console can end (on shutdown), finishing the response properly rather than dropping it."""

    def __init__(self, content: AsyncIterator[bytes], streams: set[anyio.CancelScope], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        with anyio.CancelScope() as cancel:
            self._streams.add(cancel)
            try:
                await super().__call__(scope, receive, tracked)
            finally:
                self._streams.discard(cancel)
        if cancel.cancelled_caught and started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class ConsoleApp:
    """The console's ASGI app; ``end_streams`` ends every open event stream (before a shutdown)."""

    def __init__(self, app: ASGIApp, console: _Console) -> None:
        self._app = app
        self._console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    def end_streams(self) -> None:
        """End the open event streams: browsers reconnect, to this console or the next."""
        for scope in list(self._console.streams):
            scope.cancel()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Console:
    def __init__(self, source: RunSource, operators: Operators, *, keepalive_s: float) -> None:
        self.source = source
        self.operators = operators
        self.sessions = Sessions()
        self.keepalive_s = keepalive_s
        self.page = _static("index.html")
        self.streams: set[anyio.CancelScope] = set()  # open event streams, ended when the console shuts down

    # -- pages -------------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(_static(name), media_type=_STATIC[name])

    async def login(self, request: Request) -> Response:
        operator = self.operators.by_token(request.query_params.get("token", ""))
        if operator is None:
            return Response("That login token is not valid for this console (tokens are new each time it starts).",
                            status_code=403, media_type="text/plain")
        session_id, _ = self.sessions.open(operator.identity)
        response = RedirectResponse("/", status_code=303)  # the token leaves the address bar and history
        response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        refused = self._refuse_action(request)
        if refused is not None:
            return refused
        self.sessions.close(request.cookies.get(SESSION_COOKIE))
        response = JSONResponse({"operator": None})
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- reading -----------------------------------------------------------------------------

    async def me(self, request: Request) -> Response:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return JSONResponse({"operator": None, "csrf": None, "operators": len(self.operators.all())})
        return JSONResponse({"operator": session.identity, "csrf": session.csrf,
                             "operators": len(self.operators.all())})

    async def runs(self, request: Request) -> Response:
        try:
            return JSONResponse({"runs": await self.source.runs()})
        except BusError as exc:
            return _error(503, str(exc))

    async def run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        if not _RUN_ID.match(run_id):
            return _error(404, "no such run")
        try:
            events, status = await self.source.history_so_far(run_id)
        except BusError as exc:
            return _error(503, str(exc))
        if events and events[-1].seq >= history_length(status):
            page = RunPage()
            for event in events:
                page.apply(event)
            return JSONResponse({"run": page.to_json(), "history": _history(events)})
        if status is None:
            return _error(404, f"unknown run {run_id!r}")
        # No manager sent the history (or it expired): the summary has the tasks' states, with what history there is.
        return JSONResponse({"run": page_from_status(status), "history": _history(events)})

    async def stream(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        if not _RUN_ID.match(run_id):
            return _error(404, "no such run")
        return _EventStream(self._events(run_id), self.streams, media_type="text/event-stream",
                            headers={"x-accel-buffering": "no"})

    async def _events(self, run_id: str) -> AsyncIterator[bytes]:
        """The run's page, then every new history batch with the page after it, until the run ends."""
        page = RunPage()
        yield b"retry: 2000\n\n"
        try:
            async with aclosing(self._follow(run_id, page)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BusError as exc:  # Redis away: say so; the browser reconnects in 2 s and reads again
            yield _sse("unavailable", {"error": str(exc)})

    async def _follow(self, run_id: str, page: RunPage) -> AsyncGenerator[bytes]:
        still = ""  # why the run is not moving, as the page was last told
        async with aclosing(self.source.follow(run_id, block_s=self.keepalive_s)) as batches:
            async for batch in batches:
                if not batch.events:
                    # A quiet run may be waiting for a person or a worker, or for a manager that is gone: say the last.
                    if (why := await self.source.why_still()) != still:
                        still = why
                        yield _sse("waiting", {"reason": why})
                    yield b": keep-alive\n\n"
                    continue
                if still:
                    still = ""
                    yield _sse("waiting", {"reason": ""})
                fresh = [e for e in batch.events if e.seq > page.seen]
                for event in fresh:
                    page.apply(event)
                yield _sse("history", _history(fresh))
                yield _sse("run", page.to_json())
                if any(isinstance(e.body, RunFinished) for e in fresh):
                    yield _sse("end", {"state": str(page.fold.state)})
                    return

    # -- acting ------------------------------------------------------------------------------

    def _refuse_action(self, request: Request) -> Response | None:
        """403 unless the request comes from a logged-in page of this console (session, CSRF, origin)."""
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return _error(403, "read-only: log in with an operator's login token to act")
        if not _same(request.headers.get(CSRF_HEADER, ""), session.csrf):
            return _error(403, "missing or wrong CSRF token")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
            return _error(403, f"cross-origin request from {origin!r} refused")
        return None

    async def act(self, request: Request) -> Response:
        refused = self._refuse_action(request)
        if refused is not None:
            return refused
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        operator = self.operators.get(session.identity) if session else None
        if session is None or operator is None:
            return _error(403, "this session's operator is no longer known to the console")
        run_id = request.path_params["run_id"]
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, f"request body over {MAX_BODY} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # nesting past json's recursion is as unreadable as bad syntax
            return _error(400, "the body must be a JSON object: {action, task_id, feedback}")
        problem = _check_action(data)
        if problem:
            return _error(400, problem)
        action = cast(OverrideAction, data["action"])
        task_id, feedback = str(data.get("task_id") or ""), str(data.get("feedback") or "")
        try:
            await self.source.act(run_id, task_id, action, feedback=feedback, by=operator.identity, bus=operator.bus)
        except UnknownRun as exc:
            return _error(404, str(exc))
        except ConfigError as exc:
            return _error(409, str(exc))
        except BusError as exc:
            return _error(503, str(exc))
        return JSONResponse({"sent": action, "run_id": run_id, "task_id": task_id, "by": operator.identity},
                            status_code=202)


def _check_action(data: Any) -> str:
    """What is wrong with an action request, or ''."""
    if not isinstance(data, dict):
        return "the body must be a JSON object: {action, task_id, feedback}"
    action, task_id, feedback = data.get("action"), data.get("task_id", ""), data.get("feedback", "")
    if action not in TASK_ACTIONS:
        return f"action must be one of {', '.join(TASK_ACTIONS)}, got {action!r}"
    if not isinstance(task_id, str) or not isinstance(feedback, str):
        return "task_id and feedback must be strings"
    if not task_id and action != "cancel":
        return f"{action} needs a task_id (only cancel applies to a whole run)"
    if action == "reject" and not feedback.strip():
        return "reject needs feedback: what should the next attempt change?"
    if len(feedback) > MAX_FEEDBACK:
        return f"feedback is {len(feedback)} characters; at most {MAX_FEEDBACK}"
    return ""


def _same(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def _history(events: list[Any]) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json", by_alias=True) for e in events]  # waiting.for, not for_


def _sse(event: str, data: Any) -> bytes:
    # json.dumps escapes newlines inside strings, so the data is one line whatever a worker wrote
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def console_app(source: RunSource, operators: Operators | None = None, *, keepalive_s: float = KEEPALIVE_S,
                allowed_hosts: Sequence[str] | None = None) -> ConsoleApp:
    """The console for runs on ``source``; without ``operators`` (or with none) it is read-only.

    ``allowed_hosts`` are the host names a request may address (any when None): a console on
    loopback answers only to loopback names, so a web page that rebinds its own name to 127.0.0.1
    cannot read it through the visitor's browser.
    """
    console = _Console(source, operators or Operators(), keepalive_s=keepalive_s)
    app = Starlette(routes=[
        Route("/", console.index),
        Route("/static/{name}", console.static),
        Route("/favicon.ico", lambda request: Response(status_code=204)),  # no icon; not a 404 in every console
        Route("/login", console.login),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/api/me", console.me),
        Route("/api/runs", console.runs),
        Route("/api/runs/{run_id}", console.run),
        Route("/api/runs/{run_id}/stream", console.stream),
        Route("/api/runs/{run_id}/actions", console.act, methods=["POST"]),
    ])
    guarded: ASGIApp = app if allowed_hosts is None else TrustedHostMiddleware(app, allowed_hosts=list(allowed_hosts))
    return ConsoleApp(_SecurityHeaders(guarded), console)
