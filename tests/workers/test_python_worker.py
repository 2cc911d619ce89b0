"""The built-in ``python`` worker against real sandbox processes (no mocks)."""

from __future__ import annotations

import contextlib
import os
import textwrap
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from structlog.testing import capture_logs

from protocol.errors import ConfigError, WorkerError
from tests._proc_scan import Proc, collect_descendants, descendants, wait_until_none_living
from workers.base import Task
from workers.builtin import PythonConfig, PythonWorker, SandboxError, SandboxLimits, run_snippet

pytestmark = pytest.mark.timeout(30)


def make_task(instruction: str = "", task_input: Any = None, **fields: Any) -> Task:
    return Task(run_id="run-1", task_id="t1", attempt=fields.pop("attempt", 1), capability="python",
                instruction=textwrap.dedent(instruction), input=task_input, **fields)


def code_input(code: str, args: Any = None) -> dict[str, Any]:
    return {"code": textwrap.dedent(code), "args": args}


async def run(task: Task, **config: Any) -> Any:
    return await PythonWorker(config).handle(task)


async def fails(task: Task, **config: Any) -> SandboxError:
    with pytest.raises(SandboxError) as info:
        await run(task, **config)
    return info.value


# --- what the worker returns -------------------------------------------------------------------


async def test_value_comes_from_result() -> None:
    task = make_task(task_input=code_input("result = {'sum': sum(task_input), 'items': [1, 'a', None]}", [1, 2, 3]))
    assert await run(task) == {"sum": 6, "items": [1, "a", None]}


async def test_stdout_is_the_value_when_result_is_not_set() -> None:
    assert await run(make_task("print('  hello')\nprint('world')\n")) == "hello\nworld"


async def test_result_none_is_a_value_not_a_fallback() -> None:
    assert await run(make_task("print('noise')\nresult = None")) is None


async def test_snippet_sees_task_input_deps_feedback_and_attempt() -> None:
    task = make_task(
        "result = [task_input, deps, feedback, corrections, attempt]",
        task_input={"n": 1}, attempt=3, dependencies={"t0": [1, 2]},
        feedback=("too slow", "wrong sign"), corrections=("use abs()",),
    )
    assert await run(task) == [{"n": 1}, {"t0": [1, 2]}, ["too slow", "wrong sign"], ["use abs()"], 3]


async def test_code_key_input_passes_args_as_task_input() -> None:
    task = make_task("this instruction is prose, not code", task_input=code_input("result = task_input * 2", 21))
    assert await run(task) == 42


# --- failures ----------------------------------------------------------------------------------


async def test_exception_names_type_message_and_line() -> None:
    error = await fails(make_task("x = 1\ny = 0\nz = x / y\n"))
    assert str(error) == "snippet raised ZeroDivisionError: division by zero (line 3)"
    assert isinstance(error, WorkerError)
    assert error.result is not None
    assert 'File "<snippet>", line 3' in error.result.stderr


async def test_syntax_error_names_the_line() -> None:
    error = await fails(make_task("x = 1\ndef f(:\n"))
    assert str(error).startswith("snippet raised SyntaxError:")
    assert str(error).endswith("(line 2)")


async def test_non_json_result_is_a_clear_error() -> None:
    error = await fails(make_task("result = {1, 2, 3}"))
    assert str(error) == (
        "snippet result is not JSON-serializable: TypeError: Object of type set is not JSON serializable"
    )


async def _run_watching(task: Task, seen: set[Proc], **config: Any) -> Any:
    """Run ``task`` while collecting every process below this one (the sandbox's, whatever they fork).

    Processes that were already there (a session's redis-server, a browser driver) are not the sandbox's.
    """
    failure: SandboxError | None = None
    before = descendants(os.getpid())
    async with anyio.create_task_group() as tg:
        tg.start_soon(collect_descendants, os.getpid(), seen)
        try:
            value = await run(task, **config)
        except SandboxError as exc:  # raised past the task group, not wrapped in an exception group
            failure = exc
        tg.cancel_scope.cancel()
    seen -= before
    if failure is not None:
        raise failure
    return value


async def test_wall_clock_limit_kills_the_process_group() -> None:
    snippet = """
        import os, time
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(os.getpid(), child, flush=True)
        time.sleep(60)
    """
    seen: set[Proc] = set()
    with anyio.fail_after(5), pytest.raises(SandboxError) as info:
        await _run_watching(make_task(snippet), seen, timeout_s=1)
    error = info.value
    assert str(error) == "snippet ran past its 1 s time limit"
    assert error.result is not None
    assert error.result.timed_out
    assert error.result.killed_by == "wall clock"
    assert 1.0 <= error.result.duration_s < 3
    assert len(seen) >= 4, seen  # launcher, init, snippet process, its forked child
    assert await anyio.to_thread.run_sync(wait_until_none_living, seen) == set(), "the sandbox outlived its limit"


async def test_background_child_is_killed_when_the_snippet_finishes() -> None:
    snippet = """
        import subprocess
        result = subprocess.Popen(["sleep", "60"]).pid
    """
    seen: set[Proc] = set()
    await _run_watching(make_task(snippet), seen)
    assert await anyio.to_thread.run_sync(wait_until_none_living, seen) == set()


async def test_cancelling_the_caller_kills_the_sandbox_and_removes_its_directory() -> None:
    seen: set[Proc] = set()
    workdirs: set[str] = set()
    before = descendants(os.getpid())  # a session's redis-server is not the sandbox's
    async with anyio.create_task_group() as tg:
        tg.start_soon(collect_descendants, os.getpid(), seen)
        tg.start_soon(run, make_task("import time\ntime.sleep(60)"))
        for _ in range(500):  # up to 10 s for the launcher, the init and the snippet process
            if len(seen - before) >= 3:
                break
            await anyio.sleep(0.02)
        await anyio.sleep(0.3)
        for pid, _ in seen:
            with contextlib.suppress(OSError):
                workdirs.add(os.readlink(f"/proc/{pid}/cwd"))
        tg.cancel_scope.cancel()
    seen -= before
    assert await anyio.to_thread.run_sync(wait_until_none_living, seen) == set()
    [workdir] = [w for w in workdirs if "orch-sandbox-" in w]
    assert not await anyio.Path(workdir).exists()


async def test_memory_limit_stops_runaway_allocation() -> None:
    snippet = """
        hoard = []
        while True:
            hoard.append(bytearray(10 * 1024 * 1024))
    """
    with anyio.fail_after(10):
        error = await fails(make_task(snippet), memory_mb=64)
    assert str(error) == "snippet exceeded its 64 MiB memory limit"
    assert error.result is not None
    assert error.result.killed_by == "memory"


async def test_cpu_limit_stops_a_busy_loop() -> None:
    error = await fails(make_task("while True:\n    pass\n"), timeout_s=5, cpu_s=1)
    assert str(error) == "snippet used up its 1 s CPU-time limit"
    assert error.result is not None
    assert not error.result.timed_out


async def test_file_size_limit() -> None:
    snippet = """
        with open("big.bin", "wb") as f:
            f.write(b"x" * (3 * 1024 * 1024))
    """
    error = await fails(make_task(snippet), max_file_mb=1)
    assert str(error) == "snippet exceeded its 1 MiB file size limit"


# --- isolation ---------------------------------------------------------------------------------


async def _count_connections(stream: SocketStream, seen: list[int]) -> None:
    seen.append(1)
    await stream.aclose()


async def test_network_connection_to_localhost_fails() -> None:
    seen: list[int] = []
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, anyio.create_task_group() as tg:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, lambda stream: _count_connections(stream, seen))
        snippet = """
            import socket
            socket.create_connection(("127.0.0.1", task_input), timeout=2)
            result = "connected"
        """
        error = await fails(make_task(snippet, task_input=port))
        assert str(error).startswith("snippet raised PermissionError:")
        assert "network access is disabled" in str(error)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert seen == []


async def test_a_program_the_snippet_starts_has_no_network_either() -> None:
    # The socket guard lives in the snippet's interpreter only; a fresh interpreter started by the
    # snippet is stopped by the empty network namespace, where the kernel allowed one.
    seen: list[int] = []
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, anyio.create_task_group() as tg:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, lambda stream: _count_connections(stream, seen))
        snippet = """
            import subprocess, sys
            probe = f"import socket; socket.create_connection(('127.0.0.1', {task_input}), timeout=2)"
            result = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True).returncode
        """
        outcome = await run_snippet(textwrap.dedent(snippet), globals_in={"task_input": port},
                                    limits=SandboxLimits(wall_s=10))
        if "net_namespace" not in " ".join(outcome.protections):
            pytest.skip("this kernel refused a network namespace; see docs/sandbox.md")
        assert outcome.ok, outcome.error
        assert outcome.value != 0
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert seen == []


async def test_environment_secrets_are_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_REDIS_PASSWORD", "hunter2")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("PYTHONSTARTUP", "/nonexistent")
    environ = await run(make_task("import os\nresult = dict(os.environ)"))
    assert "ORCH_REDIS_PASSWORD" not in environ
    assert "OPENAI_API_KEY" not in environ
    assert not any("hunter2" in v or "sk-secret" in v for v in environ.values())
    assert set(environ) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE"}


async def test_runs_in_an_empty_temporary_directory_that_is_removed() -> None:
    cwd, listing = await run(make_task("import os\nresult = [os.getcwd(), os.listdir('.')]"))
    assert listing == []
    assert cwd != os.getcwd()
    assert not await anyio.Path(cwd).exists()


async def test_asyncio_still_works_inside_the_sandbox() -> None:
    # asyncio's event loop needs socket.socketpair(), which the guard allows.
    snippet = """
        import asyncio
        async def main():
            await asyncio.sleep(0)
            return "ok"
        result = asyncio.run(main())
    """
    assert await run(make_task(snippet)) == "ok"


async def test_oversize_output_is_truncated() -> None:
    snippet = """
        import sys
        print("x" * 100_000)
        print("e" * 100_000, file=sys.stderr)
        result = 1
    """
    outcome = await run_snippet(textwrap.dedent(snippet), globals_in={},
                                limits=SandboxLimits(max_output_bytes=1000))
    assert outcome.ok
    assert outcome.value == 1
    assert outcome.stdout_truncated
    assert outcome.stderr_truncated
    assert outcome.stdout.startswith("x" * 1000)
    assert outcome.stdout.count("x") == 1000
    assert "truncated" in outcome.stdout
    assert outcome.stderr.startswith("e" * 1000)
    assert "e" * 1001 not in outcome.stderr


async def test_protections_are_reported() -> None:
    outcome = await run_snippet("result = 1", globals_in={}, limits=SandboxLimits())
    assert {"process_group", "wall_clock", "temp_cwd", "minimal_env", "output_caps", "no_capabilities",
            "no_new_privs", "rlimit_cpu", "rlimit_as", "rlimit_fsize"} <= set(outcome.protections)
    assert "socket_guard" not in outcome.protections  # advisory, and nothing the worker can measure
    assert outcome.measured["no_new_privs"] is True
    assert outcome.measured["pid"] not in (os.getpid(), 0)


async def test_reserved_names_are_refused() -> None:
    with pytest.raises(SandboxError, match="'result'"):
        await run_snippet("pass", globals_in={"result": 1}, limits=SandboxLimits())


def test_config_is_frozen_and_strict() -> None:
    config = PythonConfig()
    assert (config.timeout_s, config.memory_mb) == (10.0, 256)
    assert config.limits().cpu_s == 10.0
    assert (config.limits(wall_s=30).wall_s, config.limits(wall_s=30).cpu_s) == (30, 30)
    assert config.max_timeout_s == 300
    with pytest.raises(ValueError, match="Extra inputs"):
        PythonConfig.model_validate({"timeout": 3})
    with pytest.raises(ValueError, match="frozen"):
        config.timeout_s = 1  # type: ignore[misc]
    assert PythonWorker.capability == "python"


# --- the time limit a task asks for ------------------------------------------------------------

SLEEP_THEN_RESULT = "import time\ntime.sleep({seconds})\nresult = 'slept'"


def task_for(worker: PythonWorker, code: str, *, timeout_s: float | None = None,
             config: dict[str, Any] | None = None) -> Task:
    """The task as the runtime builds it from an assign with ``timeout_s`` and ``config``."""
    return make_task(code, timeout_s=timeout_s, config=worker.task_config(config or {}),
                     config_overrides=config or {})


async def test_the_tasks_timeout_replaces_the_workers_limit() -> None:
    worker = PythonWorker({"timeout_s": 0.5})
    with pytest.raises(SandboxError, match=r"^snippet ran past its 0.5 s time limit$"):
        await worker.handle(task_for(worker, SLEEP_THEN_RESULT.format(seconds=1)))
    assert await worker.handle(task_for(worker, SLEEP_THEN_RESULT.format(seconds=1), timeout_s=10)) == "slept"


async def test_the_tasks_config_timeout_sets_the_limit_and_wins_over_its_timeout() -> None:
    worker = PythonWorker()
    task = task_for(worker, SLEEP_THEN_RESULT.format(seconds=5), timeout_s=30, config={"timeout_s": 0.3})
    with pytest.raises(SandboxError, match=r"^snippet ran past its 0.3 s time limit$"):
        await worker.handle(task)


async def test_a_limit_over_the_maximum_is_clamped_and_says_so() -> None:
    worker = PythonWorker({"max_timeout_s": 0.5})
    with capture_logs() as logs, pytest.raises(SandboxError) as info:
        await worker.handle(task_for(worker, SLEEP_THEN_RESULT.format(seconds=5), timeout_s=30))
    assert str(info.value) == ("snippet ran past its 0.5 s time limit (the task's timeout_s asked for 30 s; "
                               "this worker allows at most max_timeout_s=0.5)")
    [clamped] = [e for e in logs if e["event"] == "time_limit_clamped"]
    assert (clamped["requested_s"], clamped["max_timeout_s"]) == (30, 0.5)


def test_a_task_may_not_loosen_what_the_operator_set() -> None:
    with pytest.raises(ConfigError) as info:
        PythonWorker().task_config({"python": "/bin/sh", "env": {"A": "1"}, "max_timeout_s": 9999})
    assert str(info.value) == ("task config for capability 'python' sets 'env', 'max_timeout_s', 'python', which "
                               "only the worker's own config may set")
    with pytest.raises(ConfigError, match="'allow_network_without_namespace', 'sandbox_user'"):
        PythonWorker().task_config({"sandbox_user": "root", "allow_network_without_namespace": True})


async def test_a_snippet_that_floods_the_report_channel_with_deep_json_gets_its_own_result() -> None:
    # The report channel is an inherited descriptor the snippet can find; nesting that deep exhausts json's
    # recursion (RecursionError, not ValueError), and must be skipped like any other line that is not a report.
    code = """
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, b"[" * 100_000 + b"\\n")
            except OSError:
                pass
        result = 42
    """
    assert await run(make_task(task_input=code_input(code))) == 42
