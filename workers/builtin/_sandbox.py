"""Run a Python snippet in a separate, resource-limited process and collect what it produced.

``run_snippet`` starts a fresh ``python -I`` interpreter in its own session (process group) and
an empty temporary working directory, with a minimal environment. The job (code, names for the
snippet, limits) goes in on stdin; the snippet's stdout and stderr come back on their own pipes,
capped; the outcome comes back as JSON on a dedicated pipe. See ``docs/sandbox.md`` for what this
does and does not protect against.
"""

from __future__ import annotations

import contextlib
import json
import os
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

__all__ = ("SandboxError", "SandboxLimits", "SandboxResult", "run_snippet")

_CHILD_SOURCE_PATH = Path(__file__).with_name("_sandbox_child.py")
_DRAIN_GRACE_S = 1.0  # how long to keep reading pipes after the process group is gone
_READ_CHUNK = 65536
_RESERVED_NAMES = frozenset({"result", "__name__", "__builtins__"})


class SandboxError(WorkerError):
    """A snippet failed, or the sandbox could not run it; ``result`` holds what was collected, if anything."""

    def __init__(self, message: str, *, result: SandboxResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """What one snippet may use. ``None`` switches a limit off.

    ``memory_mb`` is address space (RLIMIT_AS), not resident memory; ``max_processes`` is
    RLIMIT_NPROC, which counts every process of the user and is not enforced for root.
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
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """What came back from one snippet run.

    ``value`` is the snippet's ``result`` (``has_result`` tells a ``None`` result from none);
    ``error`` is ``"Type: message (line N)"`` when ``ok`` is false; ``killed_by`` names the limit
    that stopped the snippet (``"wall clock"``, ``"cpu"``, ``"memory"``, ``"file size"``) or the
    signal that killed it; ``protections`` lists the protections that were in force.
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


async def _feed(stdin: ByteSendStream | None, payload: bytes) -> None:
    if stdin is None:
        return
    try:
        await stdin.send(payload)
        await stdin.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the process died before reading its job; its exit status tells why


async def _drain(stream: ByteReceiveStream | None, sink: _Capped) -> None:
    if stream is None:
        return
    try:
        async for chunk in stream:
            sink.add(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


async def _drain_fd(fd: int, sink: _Capped) -> None:
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            continue
        if not chunk:
            return
        sink.add(chunk)


def _parse_channel(raw: bytes) -> tuple[list[str], dict[str, Any] | None]:
    protections: list[str] = []
    report: dict[str, Any] | None = None
    for line in raw.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue  # a line cut short by the size cap
        if message.get("kind") == "ready":
            protections = list(message.get("protections", []))
        elif message.get("kind") == "done":
            report = message
    return protections, report


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


async def run_snippet(code: str, *, globals_in: dict[str, Any], limits: SandboxLimits) -> SandboxResult:
    """Run ``code`` in a fresh interpreter with ``globals_in`` as global names and return what it produced.

    The snippet's value is whatever it assigns to the global ``result``. Snippet failures come back
    as a result with ``ok=False``; ``SandboxError`` is raised only when the sandbox itself cannot
    run (bad inputs, no interpreter).
    """
    bad = sorted(name for name in globals_in if name in _RESERVED_NAMES or not name.isidentifier())
    if bad:
        raise SandboxError(f"cannot pass these names to a snippet: {', '.join(map(repr, bad))}")
    child_source = await anyio.Path(_CHILD_SOURCE_PATH).read_text()
    workdir = await anyio.to_thread.run_sync(partial(tempfile.mkdtemp, prefix="orch-sandbox-"))
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(read_fd, False)
        try:
            payload = json.dumps({
                "code": code, "globals": globals_in, "result_fd": write_fd,
                "limits": {"cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "max_file_mb": limits.max_file_mb,
                           "max_processes": limits.max_processes, "max_open_files": limits.max_open_files,
                           "max_result_bytes": limits.max_result_bytes, "net_namespace": limits.net_namespace},
            }).encode()
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
        return await _supervise(process, payload, read_fd, limits)
    finally:
        os.close(read_fd)
        with anyio.CancelScope(shield=True):  # a cancelled caller must not leave the directory behind
            await anyio.to_thread.run_sync(partial(shutil.rmtree, workdir, ignore_errors=True))


async def _supervise(process: Process, payload: bytes, read_fd: int, limits: SandboxLimits) -> SandboxResult:
    stdout = _Capped(limits.max_output_bytes)
    stderr = _Capped(limits.max_output_bytes)
    channel = _Capped(limits.max_result_bytes + _READ_CHUNK)
    started = time.monotonic()
    timed_out = False
    try:
        with anyio.CancelScope() as drain_scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_feed, process.stdin, payload)
                tg.start_soon(_drain, process.stdout, stdout)
                tg.start_soon(_drain, process.stderr, stderr)
                tg.start_soon(_drain_fd, read_fd, channel)
                with anyio.move_on_after(limits.wall_s) as wall:
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
    protections, report = _parse_channel(bytes(channel.data))
    protections = ["process_group", "wall_clock", "temp_cwd", "minimal_env", "output_caps", *protections]
    common: dict[str, Any] = {
        "stdout": stdout.text(), "stderr": stderr.text(), "stdout_truncated": bool(stdout.dropped),
        "stderr_truncated": bool(stderr.dropped), "exit_code": process.returncode, "duration_s": duration,
        "protections": tuple(protections),
    }
    if timed_out:
        return SandboxResult(ok=False, error=f"ran past its {limits.wall_s:g} s wall-clock limit", timed_out=True,
                             killed_by="wall clock", **common)
    if report is None:
        return SandboxResult(ok=False, **_died_without_report(process.returncode, limits), **common)
    value = json.loads(report["result_json"]) if report.get("result_json") is not None else None
    return SandboxResult(ok=bool(report["ok"]), value=value, has_result=bool(report["has_result"]),
                         error=report.get("error"), killed_by=report.get("killed_by"), **common)


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
