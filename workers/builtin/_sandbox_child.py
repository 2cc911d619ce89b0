"""The program a sandbox process runs: read the job from stdin, lock itself down, run the snippet, report.

This file is never imported by the worker. ``_sandbox`` reads its source and hands it to a fresh
``python -I -c`` interpreter, so it may import only the standard library. It speaks newline-delimited
JSON on the file descriptor named in the job:

- ``{"kind": "ready", "protections": [...]}`` once the protections it could apply are in place;
- ``{"kind": "done", "ok": ..., "has_result": ..., "result_json": ..., "error": ..., "killed_by": ...}``
  when the snippet has finished.

The snippet's own stdout and stderr stay on fd 1 and fd 2, apart from this channel.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import json
import os
import resource
import signal
import socket
import sys
import traceback
from typing import Any

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_SNIPPET_FILENAME = "<snippet>"
_MIB = 1024 * 1024


def _send(fd: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unshare_network() -> str | None:
    """Move this process into a new, empty network namespace; name how, or ``None`` when the kernel refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        unshare = libc.unshare
    except (OSError, AttributeError):
        return None
    unshare.argtypes = [ctypes.c_int]
    unshare.restype = ctypes.c_int
    if unshare(_CLONE_NEWNET) == 0:  # needs CAP_SYS_ADMIN (root)
        return "net_namespace"
    if unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:  # unprivileged user namespaces, where the kernel allows them
        return "net_namespace(user namespace)"
    return None


def _block_sockets() -> None:
    """Make every socket constructor refuse, except the AF_UNIX pairs that ``socket.socketpair`` makes.

    Best effort only: ``ctypes`` can still call ``socket(2)`` directly, and a child program is not Python.
    """
    import _socket

    c_socket = _socket.socket
    original_socketpair = socket.socketpair
    allowed = [False]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "network access is disabled in the sandbox")

    class GuardedSocket(_socket.socket):
        # socket.socket.__init__ calls ``_socket.socket.__init__`` by name, so every Python-level
        # socket (socket.socket, _socket.socket, accept, fromfd, dup) passes through this check.
        def __init__(self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None) -> None:
            if not allowed[0]:
                refuse()
            c_socket.__init__(self, family, type, proto, fileno)

    def socketpair(*args: Any, **kwargs: Any) -> Any:
        # asyncio's event loop wakes itself through a socketpair; an AF_UNIX pair reaches nobody else.
        allowed[0] = True
        try:
            return original_socketpair(*args, **kwargs)
        finally:
            allowed[0] = False

    _socket.socket = GuardedSocket  # type: ignore[misc, assignment]
    socket.socketpair = socketpair
    for name in ("create_connection", "create_server", "fromfd", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        setattr(socket, name, refuse)
        if hasattr(_socket, name):
            setattr(_socket, name, refuse)


def _limit(which: int, value: int) -> bool:
    """Set soft and hard limit (so the snippet cannot raise it again); ``False`` when the kernel refused."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        return False
    return True


def _apply_limits(limits: dict[str, Any]) -> list[str]:
    applied = []
    _limit(resource.RLIMIT_CORE, 0)
    if limits.get("cpu_s") is not None:
        cpu = max(1, int(-(-limits["cpu_s"] // 1)))  # ceil, whole seconds
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        try:
            # SIGXCPU at the soft limit, SIGKILL one second later if the snippet ignores it.
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1 if hard == resource.RLIM_INFINITY else hard))
            applied.append("rlimit_cpu")
        except (ValueError, OSError):
            pass
    if limits.get("memory_mb") is not None and _limit(resource.RLIMIT_AS, int(limits["memory_mb"] * _MIB)):
        applied.append("rlimit_as")
    if limits.get("max_file_mb") is not None and _limit(resource.RLIMIT_FSIZE, int(limits["max_file_mb"] * _MIB)):
        # A write past the limit raises OSError(EFBIG) instead of killing the process with SIGXFSZ.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        applied.append("rlimit_fsize")
    if limits.get("max_processes") is not None and _limit(resource.RLIMIT_NPROC, int(limits["max_processes"])):
        # The kernel does not enforce RLIMIT_NPROC for root (CAP_SYS_RESOURCE / CAP_SYS_ADMIN).
        applied.append("rlimit_nproc" if os.geteuid() != 0 else "rlimit_nproc(not enforced for root)")
    if limits.get("max_open_files") is not None and _limit(resource.RLIMIT_NOFILE, int(limits["max_open_files"])):
        applied.append("rlimit_nofile")
    return applied


def _describe(exc: BaseException) -> str:
    """``"ZeroDivisionError: division by zero (line 3)"``: the last traceback line and the snippet's line."""
    text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    line = None
    if isinstance(exc, SyntaxError) and exc.filename == _SNIPPET_FILENAME:
        line = exc.lineno
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == _SNIPPET_FILENAME:
            line = lineno
    return f"{text} (line {line})" if line is not None else text


def _print_snippet_traceback(exc: BaseException) -> None:
    """Print the traceback to the snippet's stderr, without this bootstrap's own frame."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != _SNIPPET_FILENAME:
        tb = tb.tb_next
    if tb is None and not isinstance(exc, SyntaxError):
        tb = exc.__traceback__
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def _killed_by(exc: BaseException) -> str | None:
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "file size"
    return None


def main() -> None:
    """Run one job read from stdin and exit without running the snippet's atexit hooks or waiting for its threads."""
    job = json.loads(sys.stdin.buffer.read())
    result_fd: int = job["result_fd"]
    os.set_inheritable(result_fd, False)  # a program the snippet starts must not write to the result channel
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace")  # type: ignore[union-attr]

    protections: list[str] = []
    if job["limits"].get("net_namespace", True):
        how = _unshare_network()
        if how:
            protections.append(how)
    _block_sockets()
    protections.append("socket_guard")
    protections.extend(_apply_limits(job["limits"]))
    _send(result_fd, {"kind": "ready", "protections": protections})

    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins, **job["globals"]}
    report: dict[str, Any] = {"kind": "done", "ok": True, "has_result": False, "result_json": None,
                              "error": None, "killed_by": None}
    try:
        code = compile(job["code"], _SNIPPET_FILENAME, "exec", dont_inherit=True)
        exec(code, namespace)  # running the snippet is the whole point of this process
    except SystemExit as exc:
        if exc.code not in (None, 0):
            report.update(ok=False, error=f"SystemExit: {exc.code}")
    except BaseException as exc:  # every failure of the snippet becomes the report
        namespace.clear()  # free what a runaway allocation holds before formatting the report
        report.update(ok=False, error=_describe(exc), killed_by=_killed_by(exc))
        with contextlib.suppress(Exception):  # the report matters more than the printed traceback
            _print_snippet_traceback(exc)
        del exc
    if report["ok"] and "result" in namespace:
        report["has_result"] = True
        try:
            encoded = json.dumps(namespace["result"], allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            report.update(ok=False, error=f"result is not JSON-serializable: {type(exc).__name__}: {exc}")
        else:
            max_bytes = job["limits"].get("max_result_bytes")
            if max_bytes is not None and len(encoded) > max_bytes:
                report.update(ok=False, error=f"result is {len(encoded)} bytes of JSON, over the {max_bytes}-byte limit")
            else:
                report["result_json"] = encoded
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream must not lose the report
            stream.flush()
    _send(result_fd, report)
    os._exit(0)


if __name__ == "__main__":
    main()
