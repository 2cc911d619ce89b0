"""The program a sandbox runs: read the job, isolate itself, wait for the parent's go, run the snippet, report.

This file is never imported by the worker. ``_sandbox`` reads its source and hands it to a fresh
``python -I -c`` interpreter, so it may import only the standard library. Three processes come of it:

- the *launcher* (the process the worker started) sets a parent-death signal, unshares what
  namespaces the kernel grants (user, when not root; network, PID, mount, IPC), forks the *init*
  and waits for it;
- the *init* (PID 1 of the new PID namespace) makes the file system read-only except the work
  directory, mounts a fresh ``/proc``, forks the *snippet process* and reaps; when it exits the
  kernel kills everything left in the namespace, double-forked or not;
- the *snippet process* drops to the unprivileged uid/gid in the job (root workers) or all
  capabilities (user namespace), sets ``no_new_privs`` and the parent-death signal, applies the
  limits, says ``{"kind": "ready"}`` and blocks until the worker writes ``go`` on stdin. The worker
  measures the protections from ``/proc`` in between; nothing this process says about them counts.

It speaks newline-delimited JSON on the file descriptor named in the job: ``ready`` once set up, and
``{"kind": "done", "ok": ..., "has_result": ..., "result_json": ..., "error": ..., "killed_by": ...}``
when the snippet has finished (the snippet can write there too, so only its own result is taken
from it). The snippet's own stdout and stderr stay on fd 1 and fd 2.
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

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # the same on every architecture
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC, _MOVE_MOUNT_F_EMPTY_PATH = 0x1, 0o2000000, 0x4
_MOUNT_ATTR_RDONLY = 0x1
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_CAPABILITY_VERSION_3 = 0x20080522
_SNIPPET_FILENAME = "<snippet>"
_MIB = 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_granted = 0  # the CLONE_NEW* flags unshare() granted the launcher; the forks inherit it


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _send(fd: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           f"prctl({option})")


def _die_with_parent(expected_parent: int | None) -> None:
    """SIGKILL this process when its parent dies; exit now if the parent is already gone."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(70)


def _unshare(flags: int) -> bool:
    return bool(_libc.unshare(ctypes.c_int(flags)) == 0)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _isolate(job: dict[str, Any]) -> int:
    """Unshare what the kernel grants, most first; return the flags granted. The worker measures the outcome."""
    uid, gid = os.geteuid(), os.getegid()
    net = _CLONE_NEWNET if job["limits"].get("net_namespace", True) else 0
    if uid == 0:
        attempts = [net | _CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC, net]
    else:  # an unprivileged user gets namespaces only inside a user namespace of its own
        base = _CLONE_NEWUSER | net
        attempts = [base | _CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC, base]
    for flags in attempts:
        if flags and _unshare(flags):
            if flags & _CLONE_NEWUSER:
                # Map only our own ids (all an unprivileged process may map): files stay ours, nothing else.
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"{uid} {uid} 1")
                _write("/proc/self/gid_map", f"{gid} {gid} 1")
            return flags
    return 0


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _closed_ancestor(path: str) -> str | None:
    """The first directory on the way to ``path`` that others may not search (``/root`` for a pyenv there)."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & 0o001:
            return current
    return None


def _expose_interpreter() -> None:
    """Let the unprivileged uid reach this interpreter's standard library when it lives under a closed directory.

    A tmpfs hides the closed directory (root's home, typically) and the interpreter's prefix is
    mounted back at its own path on it: the snippet can import the standard library and sees
    nothing else of that directory.
    """
    for prefix in sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}):
        closed = _closed_ancestor(prefix)
        if closed is None or closed == prefix:
            continue
        tree = _libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(_AT_FDCWD), prefix.encode(),
                             ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE))
        if tree < 0:
            continue
        try:
            _mount("tmpfs", closed, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
            os.makedirs(prefix, exist_ok=True)
            _check(_libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(tree), b"", ctypes.c_int(_AT_FDCWD), prefix.encode(),
                                 ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount {prefix}")
        finally:
            os.close(tree)


def _mount_setattr(path: str, flags: int, *, set_: int = 0, clear: int = 0) -> None:
    attr = _MountAttr(set_, clear, 0, 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(_AT_FDCWD), path.encode(), ctypes.c_uint(flags),
                         ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr {path}")


def _private_file_system(workdir: str, drop_to: list[int] | None) -> None:
    """A fresh /proc for the new PID namespace, everything read-only but the work directory (best effort)."""
    if not _granted & _CLONE_NEWNS:
        return
    with contextlib.suppress(OSError):
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we do here propagates to the host
        if _granted & _CLONE_NEWPID:
            with contextlib.suppress(OSError):  # refused where /proc is partly masked (some containers)
                _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        if drop_to is not None and not _granted & _CLONE_NEWUSER:
            with contextlib.suppress(OSError):
                _expose_interpreter()
        _mount(workdir, workdir, None, _MS_BIND | _MS_REC)
        _mount_setattr("/", _AT_RECURSIVE, set_=_MOUNT_ATTR_RDONLY)
        _mount_setattr(workdir, 0, clear=_MOUNT_ATTR_RDONLY)


def _drop_privileges(drop_to: list[int] | None) -> None:
    """Become the unprivileged uid/gid (root launcher) or give up every capability (user namespace)."""
    if drop_to is not None and os.geteuid() == 0 and not _granted & _CLONE_NEWUSER:
        uid, gid = drop_to
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # from root to non-root: the kernel clears every capability
    elif _granted & _CLONE_NEWUSER:
        data = (_CapData * 2)()  # all zero: no effective, permitted or inheritable capability
        _check(_libc.capset(ctypes.byref(_CapHeader(_CAPABILITY_VERSION_3, 0)), data), "capset")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary or file capability can give any of it back


def _read_go() -> bool:
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 16)
        if not chunk:
            return False
        line += chunk
    return line == b"go\n"


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


def _apply_limits(limits: dict[str, Any]) -> None:
    """Set the job's resource limits; the worker measures which took hold (``/proc/<pid>/limits``)."""
    _limit(resource.RLIMIT_CORE, 0)
    if limits.get("cpu_s") is not None:
        cpu = max(1, int(-(-limits["cpu_s"] // 1)))  # ceil, whole seconds
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        with contextlib.suppress(ValueError, OSError):
            # SIGXCPU at the soft limit, SIGKILL one second later if the snippet ignores it.
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1 if hard == resource.RLIM_INFINITY else hard))
    if limits.get("memory_mb") is not None:
        _limit(resource.RLIMIT_AS, int(limits["memory_mb"] * _MIB))
    if limits.get("max_file_mb") is not None and _limit(resource.RLIMIT_FSIZE, int(limits["max_file_mb"] * _MIB)):
        # A write past the limit raises OSError(EFBIG) instead of killing the process with SIGXFSZ.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if limits.get("max_processes") is not None:
        _limit(resource.RLIMIT_NPROC, int(limits["max_processes"]))
    if limits.get("max_open_files") is not None:
        _limit(resource.RLIMIT_NOFILE, int(limits["max_open_files"]))


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


def _mirror(status: int) -> None:
    """Exit the way the wait status ``status`` says a process ended: same code, or killed by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def main() -> None:
    """The launcher: read the job, isolate, fork the init, exit as the snippet process did."""
    global _granted
    job = json.loads(sys.stdin.buffer.readline())
    _limit(resource.RLIMIT_CORE, 0)
    _die_with_parent(job["parent_pid"])
    _granted = _isolate(job)
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(status_r)
        _init(job, status_w)
    os.close(status_w)
    os.close(job["result_fd"])
    _, status = os.waitpid(pid, 0)
    with os.fdopen(status_r, "rb") as f:
        reported = f.read()
    # The init cannot die of a signal sent from inside its namespace, so it reports the snippet's status.
    _mirror(int(reported) if reported.strip().isdigit() else status)


def _init(job: dict[str, Any], status_w: int) -> None:
    try:
        _die_with_parent(None)  # the launcher; outside a new PID namespace getppid() tells nothing useful
        _private_file_system(job["workdir"], job.get("drop_to"))
        me = os.getpid()
        pid = os.fork()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"sandbox init failed: {type(exc).__name__}: {exc}\n")
            sys.stderr.flush()
        os._exit(71)
    if pid == 0:
        os.close(status_w)
        _snippet_process(job, me)
    os.close(job["result_fd"])
    os.close(0)
    while True:  # reap everything the namespace orphans; leave when the snippet process is gone
        try:
            wpid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(72)
        except InterruptedError:
            continue
        if wpid == pid:
            os.write(status_w, str(status).encode())
            os._exit(0)


def _snippet_process(job: dict[str, Any], parent: int) -> None:
    """Drop privileges, set limits, say ready, wait for go, run the snippet and report; never returns."""
    result_fd: int = job["result_fd"]
    try:
        os.chdir(job["workdir"])
        _drop_privileges(job.get("drop_to"))
        _die_with_parent(parent)  # after the drop: changing credentials clears the parent-death signal
        _apply_limits(job["limits"])
        _block_sockets()
        _send(result_fd, {"kind": "ready"})
        if not _read_go():
            os._exit(0)  # the worker measured and refused, or went away
    except Exception as exc:
        sys.stderr.write(f"sandbox set-up failed: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        os._exit(73)
    _run(job, result_fd)


def _run(job: dict[str, Any], result_fd: int) -> None:
    """Run the snippet and exit without running its atexit hooks or waiting for its threads."""
    os.set_inheritable(result_fd, False)  # a program the snippet starts must not write to the result channel
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace")  # type: ignore[union-attr]

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
