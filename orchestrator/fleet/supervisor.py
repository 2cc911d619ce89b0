"""The local supervisor behind ``orchestrator fleet up``.

Starts vLLM (when the manifest serves it) and waits for its ``/health``, then the manager and
every worker replica, each through ``_lifeline`` so that it gets SIGTERM when the supervisor
dies, even by ``kill -9``; restarts a process that exits with exponential backoff; gives a process
up (state ``failed``) after ``maxQuickRestarts`` restarts in a row that each ran less than
``stableSeconds``; on :meth:`Supervisor.stop` sends SIGTERM to every child, waits the grace
period, then SIGKILLs what is left, and stops vLLM last. Each process's output is streamed with
a ``[name]`` prefix, or written to ``<log_dir>/<name>.log``. The state file (JSON) is rewritten on
every change; ``orchestrator fleet status`` reads it. The supervisor holds an ``flock`` on the lock
file next to it (``fleet-NAME.lock``, holding its pid) for as long as it runs: a second supervisor
of the same fleet refuses to start (:class:`FleetAlreadyRunning`), and the kernel drops the lock
when the holder dies, so a stale file after a crash blocks nothing.

Signals are the CLI's business: it calls :meth:`Supervisor.stop`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import httpx
import structlog
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from orchestrator.fleet.commands import ProcessSpec, process_specs
from orchestrator.fleet.keys import KeyShares
from orchestrator.fleet.manifest import FleetManifest
from protocol.errors import OrchestratorError

__all__ = ("FleetAlreadyRunning", "ProcessState", "Supervisor", "default_state_file", "lock_file", "read_state")

_LIFELINE = Path(__file__).with_name("_lifeline.py")

log = structlog.get_logger("orchestrator.fleet")

Sink = Callable[[str, str], None]


def default_state_file(name: str) -> Path:
    """``.orchestrator/fleet-<name>.json`` under the current directory."""
    return Path(".orchestrator") / f"fleet-{name}.json"


class FleetAlreadyRunning(OrchestratorError):
    """Another supervisor holds this fleet's lock; ``pid`` is its process id (None when unreadable)."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def lock_file(state_file: Path) -> Path:
    """The lock next to a state file: ``fleet-NAME.json`` -> ``fleet-NAME.lock``."""
    return state_file.with_suffix(".lock")


def _take_lock(path: Path, fleet: str) -> int:
    """Hold ``path`` locked (the fd stays open, not inherited) with our pid in it; raise when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        pid = int(text) if text.isdigit() else None
        raise FleetAlreadyRunning(
            f"fleet {fleet!r} is already running under supervisor pid {pid if pid else '(unknown)'} "
            f"(it holds {path}); stop it first (SIGTERM to that pid) or give this one another --state-file",
            pid=pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def read_state(path: Path) -> dict[str, Any]:
    """The state file as written by a running (or stopped) supervisor."""
    return dict(json.loads(path.read_text()))


def _stdout_sink(name: str, line: str) -> None:
    sys.stdout.write(f"[{name}] {line}\n")
    sys.stdout.flush()


@dataclass
class ProcessState:
    """What the supervisor knows about one process; one row of ``fleet status``."""

    spec: ProcessSpec
    state: str = "pending"  # pending, starting, running, backoff, stopping, stopped, failed
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    started_at: float | None = None
    last_error: str = ""
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    def to_dict(self) -> dict[str, Any]:
        """The JSON row: name, pid, role, capability, state, restarts, exit_code, started_at, last_error."""
        return {"name": self.spec.name, "pid": self.pid, "role": self.spec.role, "capability": self.spec.capability,
                "state": self.state, "restarts": self.restarts, "exit_code": self.exit_code,
                "started_at": self.started_at, "last_error": self.last_error}


class Supervisor:
    """Runs a fleet's processes on this machine until :meth:`stop` (see the module docstring)."""

    def __init__(self, manifest: FleetManifest, *, state_file: Path | None = None, log_dir: Path | None = None,
                 environ: Mapping[str, str] | None = None, sink: Sink | None = None,
                 child_log_level: str = "INFO", manifest_path: str = "", keys: KeyShares | None = None) -> None:
        self.manifest = manifest
        self.state_file = state_file or default_state_file(manifest.name)
        self.log_dir = log_dir
        self.sink = sink or _stdout_sink
        self.manifest_path = manifest_path
        # ``keys``: each process's share of the keyring (``fleet.keys.hand_out``); None leaves ORCH_KEYS as inherited.
        self.processes = [ProcessState(s) for s in process_specs(manifest, environ, log_level=child_log_level,
                                                                 keys=keys)]
        self.exit_code = 0
        self._stopping = anyio.Event()  # stop the manager and workers
        self._stop_llm = anyio.Event()  # then vLLM
        self._started = time.time()
        self.ready = anyio.Event()  # every process has been started once

    # -- public ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Drain and stop everything (idempotent); :meth:`run` returns once all processes exited."""
        if not self._stopping.is_set():
            self._say("stopping: SIGTERM to every process, SIGKILL after "
                      f"{self.manifest.spec.supervisor.grace_period_seconds:g}s")
            log.info("fleet_stopping", fleet=self.manifest.name)
        self._stopping.set()

    def state(self) -> dict[str, Any]:
        """The state file's content."""
        return {"fleet": self.manifest.name, "manifest": self.manifest_path, "supervisor_pid": os.getpid(),
                "started_at": self._started, "updated_at": time.time(),
                "stopping": self._stopping.is_set(),
                "processes": [p.to_dict() for p in self.processes]}

    async def run(self) -> int:
        """Start and supervise the fleet until :meth:`stop`, or until the manager or vLLM gives up.

        Returns 0 after a clean stop, 1 when a process was given up. Raises
        :class:`FleetAlreadyRunning` (exit 1 from the CLI) when another supervisor runs this fleet.
        """
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        lock = _take_lock(lock_file(self.state_file), self.manifest.name)
        try:
            return await self._run_locked()
        finally:
            os.close(lock)  # the file stays: removing it would let a third supervisor lock a new inode

    async def _run_locked(self) -> int:
        Path(self.manifest.spec.ledger.path).parent.mkdir(parents=True, exist_ok=True)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        llm = [p for p in self.processes if p.spec.role == "llm"]
        rest = [p for p in self.processes if p.spec.role != "llm"]
        self._write_state()
        try:
            async with anyio.create_task_group() as outer:
                for p in llm:
                    outer.start_soon(self._supervise, p, self._stop_llm)
                if not llm or await self._wait_healthy(llm[0]):
                    async with anyio.create_task_group() as inner:
                        for p in rest:
                            inner.start_soon(self._supervise, p, self._stopping)
                        self.ready.set()
                self._stopping.set()
                self._stop_llm.set()
        finally:
            self._write_state()
        self._say("stopped" + (" (a process was given up; see above)" if self.exit_code else ""))
        return self.exit_code

    # -- internals -------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        self.sink("fleet", text)

    def _write_state(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        os.replace(tmp, self.state_file)

    async def _wait_healthy(self, llm: ProcessState) -> bool:
        serve = self.manifest.spec.llm.serve
        assert serve is not None  # an llm process implies serve
        assert self.manifest.llm_url is not None
        url = self.manifest.llm_url + "/health"
        self._say(f"waiting for {url} (up to {serve.startup_timeout_seconds:g}s) before starting the workers")
        deadline = anyio.current_time() + serve.startup_timeout_seconds
        async with httpx.AsyncClient(timeout=2.0) as client:
            while anyio.current_time() < deadline and not self._stopping.is_set():
                if llm.state == "failed":
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        self._say(f"{url} is healthy")
                        return True
                with anyio.move_on_after(0.5):
                    await self._stopping.wait()
        if not self._stopping.is_set():
            self._say(f"error: the LLM server never answered {url}; stopping")
            log.error("llm_unhealthy", url=url)
            self.exit_code = 1
        return False

    async def _supervise(self, proc: ProcessState, stop: anyio.Event) -> None:
        policy = self.manifest.spec.supervisor
        quick = 0
        while not stop.is_set():
            started = anyio.current_time()
            code = await self._run_once(proc, stop)
            proc.exit_code = code
            if stop.is_set():
                proc.state = "stopped"
                self._write_state()
                break
            ran = anyio.current_time() - started
            quick = quick + 1 if ran < policy.stable_seconds else 0
            proc.last_error = proc.tail[-1] if proc.tail else ""
            if quick > policy.max_quick_restarts:
                proc.state = "failed"
                self._write_state()
                self._say(f"error: {proc.spec.name} exited with {code} {quick} times in a row, each within "
                          f"{policy.stable_seconds:g}s of starting; giving up (state failed). "
                          f"Last output: {proc.last_error or '(none)'}")
                log.error("process_failed", process=proc.spec.name, exit_code=code, last_output=proc.last_error)
                self.exit_code = 1
                if proc.spec.role in ("manager", "llm"):
                    self.stop()  # no fleet without its manager (or its LLM); a worker or the console is not vital
                break
            delay = min(policy.backoff_seconds * 2 ** max(quick - 1, 0), policy.max_backoff_seconds)
            proc.state = "backoff"
            self._write_state()
            self._say(f"{proc.spec.name} (pid {proc.pid}) exited with {code} after {ran:.1f}s; "
                      f"restarting in {delay:.2f}s")
            log.warning("process_exited", process=proc.spec.name, exit_code=code, restart_in=delay)
            with anyio.move_on_after(delay):
                await stop.wait()
            if stop.is_set():
                proc.state = "stopped"
                self._write_state()
                break
            proc.restarts += 1

    async def _run_once(self, proc: ProcessState, stop: anyio.Event) -> int:
        proc.state = "starting"
        log_file: BinaryIO | None = None
        if self.log_dir is not None:
            log_file = (self.log_dir / f"{proc.spec.name}.log").open("ab")
        try:
            # Through _lifeline: SIGTERM (drain) reaches the process when this supervisor dies, even by SIGKILL.
            argv = [sys.executable, "-I", "-S", str(_LIFELINE), str(os.getpid()), str(int(signal.SIGTERM)), "--",
                    *proc.spec.argv]
            process = await anyio.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=log_file or subprocess.PIPE,
                stderr=subprocess.STDOUT, env=dict(proc.spec.env), start_new_session=True)
        except OSError as exc:
            if log_file is not None:
                log_file.close()
            proc.tail.append(f"cannot start {proc.spec.argv[0]!r}: {exc}")
            return 127
        proc.pid, proc.state, proc.started_at = process.pid, "running", time.time()
        self._write_state()
        self._say(f"started {proc.spec.name} (pid {process.pid})")
        log.info("process_started", process=proc.spec.name, pid=process.pid)
        try:
            async with anyio.create_task_group() as tg:
                pumped = anyio.Event()
                if process.stdout is not None:
                    tg.start_soon(self._pump, process, proc, pumped)
                else:
                    pumped.set()
                watch = anyio.CancelScope()
                tg.start_soon(self._terminate_on, stop, process, proc, watch)
                code = await process.wait()
                watch.cancel()
                with anyio.move_on_after(2.0):  # a grandchild may still hold the pipe open
                    await pumped.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    _kill_group(process.pid)
                    await process.wait()
                _kill_group(process.pid)  # stragglers the child left in its session
                await process.aclose()
                if log_file is not None:
                    log_file.close()
                    proc.tail.extend(_last_lines(self.log_dir / f"{proc.spec.name}.log"))  # type: ignore[operator]
        return code

    async def _pump(self, process: Process, proc: ProcessState, done: anyio.Event) -> None:
        assert process.stdout is not None
        buffer = ""
        try:
            async for chunk in TextReceiveStream(process.stdout, errors="replace"):
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    proc.tail.append(line)
                    self.sink(proc.spec.name, line)
            if buffer:
                proc.tail.append(buffer)
                self.sink(proc.spec.name, buffer)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            done.set()

    async def _terminate_on(self, stop: anyio.Event, process: Process, proc: ProcessState,
                            scope: anyio.CancelScope) -> None:
        with scope:
            await stop.wait()
            proc.state = "stopping"
            self._write_state()
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            await anyio.sleep(self.manifest.spec.supervisor.grace_period_seconds)
            self._say(f"{proc.spec.name} (pid {process.pid}) ignored SIGTERM for "
                      f"{self.manifest.spec.supervisor.grace_period_seconds:g}s; SIGKILL")
            _kill_group(process.pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _last_lines(path: Path, n: int = 20) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4096, 0))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []
