"""Run a Python snippet in a separate, isolated, resource-limited process and collect what it produced.

``run_snippet`` starts a fresh ``python -I`` interpreter in its own session (process group) and
an empty temporary working directory, with a minimal environment. The job (code, names for the
snippet, limits) goes in on stdin; the sandbox isolates itself (``_sandbox_child``) and says
ready; the worker then *measures* the protections from ``/proc`` (``_sandbox_measure``), refuses
to go on when a required one is missing, and otherwise writes ``go``. The snippet's stdout and
stderr come back on their own pipes, capped; the outcome comes back as JSON on a dedicated pipe.
See ``docs/sandbox.md`` for what this does and does not protect against.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream, Process

from protocol.errors import WorkerError
from workers.builtin._sandbox_measure import Measurement, descendant, measure

__all__ = ("SandboxError", "SandboxLimits", "SandboxResult", "run_snippet", "sandbox_identity")

_CHILD_SOURCE_PATH = Path(__file__).with_name("_sandbox_child.py")
_DRAIN_GRACE_S = 1.0  # how long to keep reading pipes after the process group is gone
_READ_CHUNK = 65536
_MIB = 1024 * 1024
_RESERVED_NAMES = frozenset({"result", "__name__", "__builtins__"})
_SNIPPET_DEPTH = 2  # launcher -> init -> snippet process
_ROOT_REQUIRES = ("unprivileged_uid", "no_supplementary_groups", "no_capabilities", "no_new_privs")


class SandboxError(WorkerError):
    """A snippet failed, or the sandbox could not run it; ``result`` holds what was collected, if anything."""

    def __init__(self, message: str, *, result: SandboxResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """What one snippet may use. ``None`` switches a limit off.

    ``memory_mb`` is address space (RLIMIT_AS), not resident memory; ``max_processes`` is
    RLIMIT_NPROC, which counts every process of the user the snippet runs as.

    ``net_namespace`` asks for an empty network namespace; ``require_net_namespace`` refuses to
    run a snippet when the worker does not measure one (set it false only to run with network
    access where no namespace can be had, or with ``net_namespace`` off). ``sandbox_user`` is the account a root worker runs
    snippets as (default ``nobody``); an unprivileged worker keeps its uid and gets a user
    namespace without capabilities instead.
    """

    wall_s: float = 10.0
    cpu_s: float | None = 10.0
    memory_mb: int | None = 256
    max_file_mb: int | None = 16
    max_processes: int | None = None
    max_open_files: int | None = 256
    max_output_bytes: int = 64 * 1024
    max_result_bytes: int = 4 * 1024 * 1024
    net_namespace: bool = True
    require_net_namespace: bool = True
    sandbox_user: str | None = None
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """What came back from one snippet run.

    ``value`` is the snippet's ``result`` (``has_result`` tells a ``None`` result from none);
    ``error`` is ``"Type: message (line N)"`` when ``ok`` is false; ``killed_by`` names the limit
    that stopped the snippet (``"wall clock"``, ``"cpu"``, ``"memory"``, ``"file size"``) or the
    signal that killed it; ``protections`` names the protections the worker measured on the
    snippet's process before letting it run, and ``measured`` holds the raw figures.
    """

    ok: bool
    value: Any = None
    has_result: bool = False
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str | None = None
    timed_out: bool = False
    killed_by: str | None = None
    exit_code: int | None = None
    duration_s: float = 0.0
    protections: tuple[str, ...] = ()
    measured: dict[str, Any] = field(default_factory=dict)


class _Capped:
    """Keep the first ``limit`` bytes of a stream and count the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def text(self) -> str:
        text = self.data.decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[... {self.dropped} more bytes truncated]"
        return text


def _minimal_env(workdir: str, extra: dict[str, str]) -> dict[str, str]:
    # Nothing is inherited: no ORCH_*, *_KEY, tokens, proxies or PYTHON* variables reach the snippet.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env.update(extra)
    return env


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group is already gone
        os.killpg(pid, signal.SIGKILL)


def sandbox_identity(user: str | None) -> tuple[int, int] | None:
    """The ``(uid, gid)`` a root worker runs snippets as (``user``, default ``nobody``); None when not root.

    Raises ``SandboxError`` naming the account when it does not exist or is root itself, or when
    an unprivileged worker names another account than its own.
    """
    if os.geteuid() != 0:
        if user is not None and _account(user)[0] != os.geteuid():
            raise SandboxError(f"sandbox_user {user!r}: only a worker running as root can run snippets as another "
                               "user; this one keeps its own uid and drops its capabilities in a user namespace")
        return None
    name = user if user is not None else "nobody"
    uid, gid = _account(name)
    if uid is None or gid is None:
        raise SandboxError(f"sandbox_user {name!r} does not exist on this machine; a root worker needs an unprivileged "
                           "account to run snippets as (set sandbox_user in the python worker's config)")
    if uid == 0 or gid == 0:
        raise SandboxError(f"sandbox_user {name!r} has uid {uid} / gid {gid}; snippets must not run as root")
    return uid, gid


def _account(user: str) -> tuple[int | None, int | None]:
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError, OverflowError):
        return None, None
    return entry.pw_uid, entry.pw_gid


def required_protections(limits: SandboxLimits) -> tuple[str, ...]:
    """What must be measured on the snippet's process before it may run, for this worker and ``limits``."""
    required: list[str] = list(_ROOT_REQUIRES) if os.geteuid() == 0 else ["no_capabilities", "no_new_privs"]
    if limits.require_net_namespace:
        required.append("net_namespace")
    return tuple(required)


def _wanted_rlimits(limits: SandboxLimits) -> dict[str, int]:
    wanted = {"rlimit_core": 0}
    if limits.cpu_s is not None:
        wanted["rlimit_cpu"] = max(1, int(-(-limits.cpu_s // 1)))
    for name, value, scale in (("rlimit_as", limits.memory_mb, _MIB), ("rlimit_fsize", limits.max_file_mb, _MIB),
                               ("rlimit_nproc", limits.max_processes, 1), ("rlimit_nofile", limits.max_open_files, 1)):
        if value is not None:
            wanted[name] = int(value * scale)
    return wanted


class _Channel:
    """The sandbox's JSON lines: notices the first ``ready`` as it arrives and keeps everything, capped."""

    def __init__(self, limit: int) -> None:
        self.data = _Capped(limit)
        self.ready = anyio.Event()

    def add(self, chunk: bytes) -> None:
        self.data.add(chunk)
        if not self.ready.is_set() and b"\n" in self.data.data:
            first = bytes(self.data.data).split(b"\n", 1)[0]
            with contextlib.suppress(ValueError, AttributeError, RecursionError):
                if json.loads(first).get("kind") == "ready":
                    self.ready.set()

    def report(self) -> dict[str, Any] | None:
        """The last ``done`` after ``ready``: the snippet's outcome, the only thing taken from this channel.

        The snippet can write here too, but only about itself; the bootstrap's own report comes last.
        """
        found = None
        for line in bytes(self.data.data).splitlines()[1:]:
            try:
                message = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by the size cap, or the snippet's own (nested past the parser, even)
            if isinstance(message, dict) and message.get("kind") == "done":
                found = message
        return found


async def _send(stdin: ByteSendStream | None, payload: bytes, *, close: bool) -> None:
    if stdin is None:
        return
    try:
        await stdin.send(payload)
        if close:
            await stdin.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the process died; its exit status tells why


async def _drain(stream: ByteReceiveStream | None, sink: _Capped) -> None:
    if stream is None:
        return
    try:
        async for chunk in stream:
            sink.add(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


async def _drain_fd(fd: int, sink: _Capped | _Channel) -> None:
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            continue
        if not chunk:
            return
        sink.add(chunk)


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


async def run_snippet(code: str, *, globals_in: dict[str, Any], limits: SandboxLimits) -> SandboxResult:
    """Run ``code`` in a fresh, isolated interpreter with ``globals_in`` as global names; return what it produced.

    The snippet's value is whatever it assigns to the global ``result``. Snippet failures come back
    as a result with ``ok=False``; ``SandboxError`` is raised when the sandbox itself cannot run
    (bad inputs, no interpreter, no such ``sandbox_user``) or lacks a required protection, measured
    before the snippet starts (``error.result`` then holds the measurement).
    """
    bad = sorted(name for name in globals_in if name in _RESERVED_NAMES or not name.isidentifier())
    if bad:
        raise SandboxError(f"cannot pass these names to a snippet: {', '.join(map(repr, bad))}")
    drop_to = sandbox_identity(limits.sandbox_user)
    child_source = await anyio.Path(_CHILD_SOURCE_PATH).read_text()
    workdir = await anyio.to_thread.run_sync(partial(tempfile.mkdtemp, prefix="orch-sandbox-"))
    read_fd, write_fd = os.pipe()
    try:
        if drop_to is not None:
            os.chown(workdir, *drop_to)  # the only place the snippet may write
        os.set_blocking(read_fd, False)
        try:
            payload = json.dumps({
                "code": code, "globals": globals_in, "result_fd": write_fd, "parent_pid": os.getpid(),
                "workdir": workdir, "drop_to": drop_to,
                "limits": {"cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "max_file_mb": limits.max_file_mb,
                           "max_processes": limits.max_processes, "max_open_files": limits.max_open_files,
                           "max_result_bytes": limits.max_result_bytes, "net_namespace": limits.net_namespace},
            }).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise SandboxError(f"the snippet's inputs are not JSON-serializable: {exc}") from exc
        try:
            process = await anyio.open_process(
                [limits.python, "-I", "-c", child_source],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=workdir, env=_minimal_env(workdir, limits.extra_env),
                start_new_session=True, pass_fds=(write_fd,),
            )
        except OSError as exc:
            raise SandboxError(f"cannot start the sandbox interpreter {limits.python!r}: {exc}") from exc
        finally:
            os.close(write_fd)
        return await _supervise(process, payload, read_fd, limits, workdir)
    finally:
        os.close(read_fd)
        with anyio.CancelScope(shield=True):  # a cancelled caller must not leave the directory behind
            await anyio.to_thread.run_sync(partial(shutil.rmtree, workdir, ignore_errors=True))


async def _ready_or_exit(process: Process, ready: anyio.Event) -> bool:
    async with anyio.create_task_group() as tg:
        async def exited() -> None:
            await process.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(exited)
        await ready.wait()
        tg.cancel_scope.cancel()
    return ready.is_set()


def _inspect(process: Process, limits: SandboxLimits, workdir: str) -> tuple[Measurement | None, list[str], str | None]:
    """Measure the snippet's process: the measurement, its protections, and why it may not run (None: it may)."""
    pid = descendant(process.pid, _SNIPPET_DEPTH)
    if pid is None:
        return None, [], "the sandbox's snippet process could not be found to measure its protections"
    try:
        measured = measure(pid)
    except OSError as exc:
        return None, [], f"the sandbox's protections could not be measured: {exc}"
    protections = measured.protections(workdir, _wanted_rlimits(limits))
    missing = [name for name in required_protections(limits) if name not in protections]
    if not missing:
        return measured, protections, None
    reason = f"the sandbox lacks {', '.join(missing)} (measured: {', '.join(protections) or 'nothing'})"
    if "net_namespace" in missing and not limits.net_namespace:
        reason += ("; net_namespace is off in the config; set allow_network_without_namespace: true as well to "
                   "run snippets with network access")
    elif "net_namespace" in missing:
        reason += ("; no network namespace can be had here (the kernel refused unshare(CLONE_NEWNET): not root, "
                   "and unprivileged user namespaces are off or restricted? see user.max_user_namespaces, "
                   "kernel.apparmor_restrict_unprivileged_userns, the container's seccomp profile); set "
                   "allow_network_without_namespace: true in the python worker's config to run snippets with "
                   "network access anyway")
    return measured, protections, reason


async def _supervise(process: Process, payload: bytes, read_fd: int, limits: SandboxLimits,
                     workdir: str) -> SandboxResult:
    stdout = _Capped(limits.max_output_bytes)
    stderr = _Capped(limits.max_output_bytes)
    channel = _Channel(limits.max_result_bytes + _READ_CHUNK)
    started = time.monotonic()
    timed_out = False
    refused: str | None = None
    measured: Measurement | None = None
    protections: list[str] = []
    try:
        with anyio.CancelScope() as drain_scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(_send, process.stdin, payload, close=False))
                tg.start_soon(_drain, process.stdout, stdout)
                tg.start_soon(_drain, process.stderr, stderr)
                tg.start_soon(_drain_fd, read_fd, channel)
                with anyio.move_on_after(limits.wall_s) as wall:
                    if await _ready_or_exit(process, channel.ready):
                        # The snippet has not started: measure it, then let it go, or refuse.
                        measured, protections, refused = _inspect(process, limits, workdir)
                        if refused is None:
                            await _send(process.stdin, b"go\n", close=True)
                        else:
                            _kill_group(process.pid)
                    await process.wait()
                timed_out = wall.cancelled_caught
                # Also ends whatever the snippet started in the background and left behind.
                _kill_group(process.pid)
                await process.wait()
                # A process that left the group (setsid) may still hold a pipe open: stop reading soon.
                drain_scope.deadline = anyio.current_time() + _DRAIN_GRACE_S
    finally:
        with anyio.CancelScope(shield=True):
            _kill_group(process.pid)
            await process.aclose()
    duration = time.monotonic() - started
    protections = ["process_group", "wall_clock", "temp_cwd", "minimal_env", "output_caps", *protections]
    common: dict[str, Any] = {
        "stdout": stdout.text(), "stderr": stderr.text(), "stdout_truncated": bool(stdout.dropped),
        "stderr_truncated": bool(stderr.dropped), "exit_code": process.returncode, "duration_s": duration,
        "protections": tuple(protections), "measured": measured.to_dict() if measured else {},
    }
    if refused is not None:
        raise SandboxError(f"refusing to run the snippet: {refused}",
                           result=SandboxResult(ok=False, error=refused, **common))
    if timed_out:
        return SandboxResult(ok=False, error=f"ran past its {limits.wall_s:g} s wall-clock limit", timed_out=True,
                             killed_by="wall clock", **common)
    report = channel.report() if channel.ready.is_set() else None
    if report is None:
        return SandboxResult(ok=False, **_died_without_report(process.returncode, limits), **common)
    try:
        value = json.loads(report["result_json"]) if report.get("result_json") is not None else None
        return SandboxResult(ok=bool(report["ok"]), value=value, has_result=bool(report["has_result"]),
                             error=_text_or_none(report.get("error")),
                             killed_by=_text_or_none(report.get("killed_by")), **common)
    except (KeyError, TypeError, ValueError, RecursionError):
        return SandboxResult(ok=False, error="the snippet's report is malformed", **common)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _died_without_report(returncode: int | None, limits: SandboxLimits) -> dict[str, Any]:
    if returncode is None or returncode >= 0:
        return {"error": f"the sandbox process exited with status {returncode} without a report", "killed_by": None}
    name = _signal_name(returncode)
    if name == "SIGXCPU" and limits.cpu_s is not None:
        return {"error": f"used up its {limits.cpu_s:g} s CPU-time limit", "killed_by": "cpu"}
    if name == "SIGKILL" and limits.cpu_s is not None:
        # Without a wall-clock timeout, SIGKILL is RLIMIT_CPU's hard limit or the kernel's OOM killer.
        return {"error": "killed by SIGKILL (its CPU-time hard limit, or the kernel's OOM killer)", "killed_by": name}
    return {"error": f"killed by {name}", "killed_by": name}
