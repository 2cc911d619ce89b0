"""The command line contracts scripts rely on, with real processes against a real redis-server.

Exit codes (0 accepted, 1 failed or cancelled, 2 unknown run or bad input, 3 not ended yet, 141
stdout closed), ``--json`` errors on stdout, ``ORCH_*`` values named when invalid, ``submit --wait``
without a manager, and a closed pipe. Each test's processes are started here and killed by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests._redis import free_port
from tests._trust import env_without_orch

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "orchestrator"
# The console script a user runs; ``python -m orchestrator.cli`` where it is not installed next to python.
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "orchestrator.cli"]

pytestmark = pytest.mark.timeout(120)


def _env(**extra: str) -> dict[str, str]:
    env = env_without_orch(keep_keyring=True)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else _env(), stdin=subprocess.DEVNULL)


def error_json(proc: subprocess.CompletedProcess[str]) -> str:
    """The ``error`` of the one JSON object on stdout."""
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    assert isinstance(data["error"], str)
    assert data["error"]
    return data["error"]


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Error:" not in proc.stderr.replace("orchestrator: error:", ""), proc.stderr


@dataclass
class Fleet:
    """A manager and a ``python`` worker in their own namespace of the session's redis-server."""

    url: str
    namespace: str
    tmp: Path

    @property
    def env(self) -> dict[str, str]:
        return _env(ORCH_REDIS_URL=self.url, ORCH_NAMESPACE=self.namespace)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return cli(*args, env=self.env, timeout=timeout)

    def job(self, name: str, body: str) -> Path:
        path = self.tmp / f"{name}.yaml"
        path.write_text(body)
        return path

    def status(self, run_id: str) -> dict[str, Any]:
        proc = self.run("status", run_id, "--json")
        assert proc.returncode in (0, 1, 3), proc.stderr
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def until(self, run_id: str, ok: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if ok(status):
                return status
            assert time.monotonic() < deadline, f"run {run_id} never got there: {status}"
            time.sleep(0.3)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([*COMMAND, "--log-level", "INFO", *args], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def fleet(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    f = Fleet(redis_url, f"t{uuid.uuid4().hex[:10]}", tmp)
    procs = [_spawn(["manager", "--ledger", str(tmp / "ledger.db"), "--manager-lease-s", "2"], f.env,
                    tmp / "manager.log"),
             _spawn(["worker", "--capability", "python", "--concurrency", "2"], f.env, tmp / "worker.log")]
    try:
        yield f
    finally:
        for proc in procs:
            _kill(proc)


ONE_TASK = "goal: {goal}\ntasks:\n  - id: t\n    capability: python\n    instruction: result = 1\n{extra}"


@dataclass
class Runs:
    accepted: str
    failed: str
    cancelled: str
    running: str


@pytest.fixture(scope="module")
def runs(fleet: Fleet) -> Runs:
    """One run in each state, made through the CLI: ``submit --wait`` exits 0 accepted, 1 failed."""
    accepted = fleet.run("submit", str(fleet.job("ok", ONE_TASK.format(goal="ok", extra="    spec: {expect: 1}\n"))),
                         "--wait", "--json")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["state"] == "accepted"
    failed = fleet.run("submit", str(fleet.job("bad", ONE_TASK.format(
        goal="bad", extra="    max_attempts: 1\n    spec: {expect: 2}\n"))), "--wait", "--json")
    assert failed.returncode == 1, failed.stderr
    assert json.loads(failed.stdout)["state"] == "failed"
    held = fleet.job("held", ONE_TASK.format(goal="held", extra="    spec: {approval: human}\n"))
    waiting = [fleet.run("submit", str(held)).stdout.strip() for _ in range(2)]
    for run_id in waiting:
        fleet.until(run_id, lambda s: s["tasks"][0]["state"] == "verify_done")
    cancel = fleet.run("cancel", waiting[0])
    assert cancel.returncode == 0, cancel.stderr
    fleet.until(waiting[0], lambda s: s["state"] == "cancelled")
    return Runs(json.loads(accepted.stdout)["run_id"], json.loads(failed.stdout)["run_id"], waiting[0], waiting[1])


# -- 1. status and watch exit codes ------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize(("which", "state", "code"), [
    ("accepted", "accepted", 0), ("failed", "failed", 1), ("cancelled", "cancelled", 1), ("running", "running", 3),
])
def test_status_exit_code_says_how_the_run_ended(fleet: Fleet, runs: Runs, which: str, state: str,
                                                 code: int) -> None:
    run_id = getattr(runs, which)
    for as_json in (False, True):
        proc = fleet.run("status", run_id, *(["--json"] if as_json else []))
        assert proc.returncode == code, proc.stderr
        if as_json:
            assert json.loads(proc.stdout)["state"] == state
        else:
            assert f"[{state}]" in proc.stdout


@pytest.mark.redis
@pytest.mark.parametrize(("which", "code"), [("accepted", 0), ("failed", 1), ("cancelled", 1)])
def test_watch_of_an_ended_run_summarizes_it_and_exits_with_its_code(fleet: Fleet, runs: Runs, which: str,
                                                                     code: int) -> None:
    proc = fleet.run("watch", getattr(runs, which), timeout=30)
    assert proc.returncode == code, proc.stderr
    assert f"run {which}" in proc.stdout
    no_traceback(proc)


@pytest.mark.redis
def test_watch_follows_a_running_run_to_its_end(fleet: Fleet) -> None:
    held = fleet.job("follow", ONE_TASK.format(goal="follow", extra="    spec: {approval: human}\n"))
    run_id = fleet.run("submit", str(held)).stdout.strip()
    env = fleet.env
    watch = subprocess.Popen([*COMMAND, "watch", run_id], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fleet.until(run_id, lambda s: s["tasks"][0]["state"] == "verify_done")
        time.sleep(1)
        assert watch.poll() is None, "watch must follow a running run, not end"
        assert fleet.run("cancel", run_id, "t").returncode == 0
        out, err = watch.communicate(timeout=30)
    finally:
        _kill(watch)
        watch.communicate(timeout=10)
    assert watch.returncode == 1, err
    assert "run cancelled" in out


@pytest.mark.redis
@pytest.mark.parametrize("verb", ["status", "watch", "events"])
def test_an_unknown_run_exits_2_at_once_saying_so(fleet: Fleet, verb: str) -> None:
    start = time.monotonic()
    proc = fleet.run(verb, "no-such-run", timeout=30)
    assert proc.returncode == 2
    assert time.monotonic() - start < 8  # at once: no silent polling (process start included, on a busy machine)
    assert "unknown run 'no-such-run'" in proc.stderr
    no_traceback(proc)
    if verb != "watch":
        assert "unknown run 'no-such-run'" in error_json(fleet.run(verb, "no-such-run", "--json"))


@pytest.mark.redis
def test_status_of_a_submission_no_manager_took_yet_says_it_is_queued(redis_url: str, tmp_path: Path) -> None:
    env = _env(ORCH_REDIS_URL=redis_url, ORCH_NAMESPACE=f"t{uuid.uuid4().hex[:10]}")  # no manager here
    job = tmp_path / "job.yaml"
    job.write_text(ONE_TASK.format(goal="queued", extra=""))
    submitted = cli("submit", str(job), env=env)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    assert f"no active manager; run {run_id} is queued until one starts" in submitted.stderr
    proc = cli("status", run_id, "--json", env=env)
    assert proc.returncode == 3, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["run_id"], data["state"]) == (run_id, "queued")
    assert [t["id"] for t in data["tasks"]] == ["t"]
    watch = subprocess.Popen([*COMMAND, "watch", run_id], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert watch.poll() is None  # it follows the queued run
    finally:
        _kill(watch)
        _, err = watch.communicate(timeout=10)
    assert f"run {run_id} is queued: waiting for a manager" in err


@pytest.mark.redis
def test_watch_says_when_no_manager_moves_the_run_and_when_one_does_again(redis_url: str, tmp_path: Path) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    env = _env(ORCH_REDIS_URL=redis_url, ORCH_NAMESPACE=namespace)

    def manager() -> subprocess.Popen[bytes]:
        return _spawn(["manager", "--ledger", str(tmp_path / "ledger.db"), "--manager-lease-s", "2"], env,
                      tmp_path / "manager.log")

    first = manager()
    job = tmp_path / "job.yaml"
    job.write_text(ONE_TASK.format(goal="unserved", extra=""))  # no worker serves python here: it stays running
    submitted = cli("submit", str(job), env=env)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    lines: queue.Queue[str] = queue.Queue()
    watch = subprocess.Popen([*COMMAND, "watch", run_id], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = None

    def said(text: str, within_s: float) -> str:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=0.2)
                if text in line:
                    return line
        raise AssertionError(f"watch never said {text!r} within {within_s} s")

    reader = threading.Thread(target=lambda: [lines.put(line) for line in watch.stderr or ()], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while json.loads(cli("status", run_id, "--json", env=env).stdout)["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        time.sleep(1)
        os.kill(first.pid, signal.SIGKILL)  # its lease lapses after 2 s; nobody releases it
        line = said("no manager holds the manager lease", within_s=20)
        assert f"'{namespace}:{{mgr}}:lease'" in line
        assert f"on run {run_id}: " in line
        assert "the run is not moving" in line
        assert watch.poll() is None, "watch waits for a manager, saying so"
        second = manager()
        assert f"run {run_id} goes on" in said("a manager holds the lease again", within_s=30)
        assert cli("cancel", run_id, env=env).returncode == 0
        assert watch.wait(timeout=30) == 1
    finally:
        for proc in (watch, first, *([second] if second else [])):
            _kill(proc)
        reader.join(timeout=10)  # the pipe ends with the process
        if watch.stderr is not None:
            watch.stderr.close()


@pytest.mark.redis
def test_submit_wait_of_a_submission_the_manager_refuses_exits_1_with_its_reason(fleet: Fleet, tmp_path: Path) -> None:
    # An operator key the manager does not know (another keyring): the manager dead-letters the submission.
    keys = tmp_path / "other-keys"
    assert cli("keys", "init", "--keys", str(keys), "--operator", "tests", env=fleet.env).returncode == 0
    job = fleet.job("stranger", ONE_TASK.format(goal="stranger", extra=""))
    start = time.monotonic()
    proc = cli("submit", str(job), "--wait", "--json", env={**fleet.env, "ORCH_KEYS": str(keys)}, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1, proc.stderr
    error = error_json(proc)
    assert "the manager refused the submission of run" in error
    assert "signature" in error or "key" in error  # the manager's reason, as it dead-lettered the frame


# -- 2. submit --wait without a manager ----------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("as_json", [False, True])
def test_submit_wait_without_a_manager_says_so_within_10_s_and_exits_1(redis_url: str, tmp_path: Path,
                                                                       as_json: bool) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    env = _env(ORCH_REDIS_URL=redis_url, ORCH_NAMESPACE=namespace)
    job = tmp_path / "job.yaml"
    job.write_text(ONE_TASK.format(goal="nobody", extra=""))
    start = time.monotonic()
    proc = cli("submit", str(job), "--wait", *(["--json"] if as_json else []), env=env, timeout=30)
    assert time.monotonic() - start < 10
    assert proc.returncode == 1
    assert "no active manager" in proc.stderr
    assert f"manager lease '{namespace}:{{mgr}}:lease'" in proc.stderr  # what it waited for
    assert "the job was not submitted" in proc.stderr
    no_traceback(proc)
    if as_json:
        assert "no active manager" in error_json(proc)
    else:
        assert proc.stdout == ""


@pytest.mark.redis
def test_the_lease_submit_looks_for_is_the_one_a_manager_holds(fleet: Fleet, runs: Runs) -> None:
    # The module's manager holds the lease, so submit --wait does not complain: it ran in ``runs``.
    # Here the same client check, in process, against that manager's lease.
    import anyio

    from orchestrator import processes

    holder = anyio.run(lambda: processes.active_manager(fleet.url, namespace=fleet.namespace))
    assert holder is not None
    assert "@" in holder  # NAME@EPOCH, as LeaderLease writes it


# -- 3. a closed pipe ------------------------------------------------------------------------------------


def _closed_stdout(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stdout a pipe whose reader is already gone, as ``| head -1`` after its line."""
    proc = subprocess.Popen([*COMMAND, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


@pytest.mark.redis
@pytest.mark.parametrize("args", [["events", "{run}", "--json"], ["events", "{run}"], ["status", "{run}", "--json"],
                                  ["status", "{run}"], ["watch", "{run}"]])
def test_a_closed_pipe_ends_quietly_with_141(fleet: Fleet, runs: Runs, args: list[str]) -> None:
    code, err = _closed_stdout([a.format(run=runs.accepted) for a in args], fleet.env)
    assert err == ""
    assert code == 141


def test_a_closed_pipe_ends_plugins_quietly() -> None:
    code, err = _closed_stdout(["plugins"], _env())
    assert (code, err) == (141, "")


@pytest.mark.redis
def test_events_json_piped_to_head_prints_one_line_and_no_traceback(fleet: Fleet, runs: Runs) -> None:
    proc = subprocess.run(f"{' '.join(COMMAND)} events {runs.accepted} --json | head -1", shell=True, cwd=ROOT,
                          env=fleet.env, capture_output=True, text=True, timeout=60)
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["seq"] == 1


# -- 4. bad ORCH_* values -------------------------------------------------------------------------------


LEASE_VERBS = [["status", "r"], ["events", "r"], ["watch", "r"], ["submit", "examples/quickstart.yaml"],
               ["cancel", "r"], ["approve", "r", "t"], ["manager"], ["worker", "--capability", "python"]]


@pytest.mark.parametrize("args", LEASE_VERBS, ids=lambda a: a[0])
def test_a_bad_orch_value_fails_the_verbs_that_use_it_with_2_naming_it(args: list[str]) -> None:
    proc = cli(*args, env=_env(ORCH_LEASE_S="abc"))
    assert proc.returncode == 2
    assert "ORCH_LEASE_S='abc'" in proc.stderr
    no_traceback(proc)


@pytest.mark.parametrize("args", [["plugins"], ["run", "examples/quickstart.yaml", "--json"], ["fleet", "--help"]],
                         ids=lambda a: a[0])
def test_verbs_that_do_not_use_a_bad_orch_value_are_not_stopped_by_it(args: list[str]) -> None:
    proc = cli(*args, env=_env(ORCH_LEASE_S="abc", ORCH_METRICS_PORT="x", ORCH_MAX_QUEUE="many"))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("var", "value", "args", "shown"), [
    ("ORCH_LEASE_S", "-1", ["status", "r"], "ORCH_LEASE_S='-1'"),
    ("ORCH_METRICS_PORT", "x", ["manager"], "ORCH_METRICS_PORT='x'"),
    ("ORCH_METRICS_PORT", "70000", ["worker", "--capability", "python"], "ORCH_METRICS_PORT='70000'"),
    ("ORCH_MAX_QUEUE", "0", ["manager"], "ORCH_MAX_QUEUE='0'"),
    ("ORCH_MIRROR", "everything", ["manager"], "ORCH_MIRROR='everything'"),
    ("ORCH_NAMESPACE", "a:b", ["status", "r"], "ORCH_NAMESPACE='a:b'"),
    ("ORCH_REDIS_URL", "http://user:secret@host", ["status", "r"], "ORCH_REDIS_URL='http://user:***@host'"),
    ("ORCH_LLM_TIMEOUT", "soon", ["run", "a goal in words"], "ORCH_LLM_TIMEOUT='soon'"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("ORCH_") else None)
def test_each_bad_orch_value_is_named_with_its_value(var: str, value: str, args: list[str], shown: str) -> None:
    extra = {var: value}
    if var == "ORCH_LLM_TIMEOUT":
        extra["ORCH_LLM_URL"] = "http://127.0.0.1:9/v1"
    proc = cli(*args, env=_env(**extra))
    assert proc.returncode == 2
    assert shown in proc.stderr
    assert "secret" not in proc.stderr
    no_traceback(proc)


def test_a_bad_orch_value_under_json_is_an_error_object() -> None:
    proc = cli("status", "r", "--json", env=_env(ORCH_LEASE_S="abc"))
    assert proc.returncode == 2
    assert "ORCH_LEASE_S='abc'" in error_json(proc)


# -- 5. --json errors --------------------------------------------------------------------------------------


def _bad_check_job(tmp_path: Path) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text("goal: g\ntasks:\n  - {id: a, capability: python, instruction: result = 1}\n"
                   "  - {id: x, capability: python, instruction: result = 1, spec: {check: 'nosuchmod:fn'}}\n")
    return job


@pytest.mark.parametrize("args", [["run", "{bad}", "--json"], ["run", "{missing}", "--json"],
                                  ["run", "{check}", "--json"], ["submit", "{bad}", "--json"],
                                  ["submit", "{check}", "--json"], ["submit", "{check}", "--wait", "--json"],
                                  ["status", "--json"], ["run", "--json"], ["fleet", "status", "{missing}", "--json"]],
                         ids=lambda a: "-".join(a))
def test_json_commands_that_cannot_start_print_an_error_object_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("goal: g\ntasks:\n  - id: a\n")
    paths = {"bad": str(bad), "missing": str(tmp_path / "missing.yaml"), "check": str(_bad_check_job(tmp_path))}
    proc = cli(*[a.format(**paths) for a in args], env=_env(ORCH_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    assert proc.returncode == 2, proc.stderr
    error_json(proc)
    no_traceback(proc)


def test_json_run_that_cannot_reach_its_llm_prints_an_error_object_and_exits_1() -> None:
    proc = cli("run", "a goal", "--llm-url", "http://127.0.0.1:9/v1", "--json")
    assert proc.returncode == 1
    assert "cannot reach the LLM server" in error_json(proc)


def test_json_status_that_cannot_reach_redis_prints_an_error_object_and_exits_1() -> None:
    proc = cli("status", "r", "--json", env=_env(ORCH_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    assert proc.returncode == 1
    assert "cannot reach Redis" in error_json(proc) or "127.0.0.1" in error_json(proc)
    no_traceback(proc)


# -- 6. spec.check resolved when the job is loaded -----------------------------------------------------------


@pytest.mark.parametrize("verb", ["run", "submit"])
def test_a_check_that_is_not_registered_exits_2_naming_the_task_and_field(tmp_path: Path, verb: str) -> None:
    job = _bad_check_job(tmp_path)
    proc = cli(verb, str(job), env=_env(ORCH_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    assert proc.returncode == 2
    assert f"{job}: task 'x': field 'spec.check': check 'nosuchmod:fn' is not registered" in proc.stderr
    no_traceback(proc)


@pytest.mark.parametrize("verb", ["run", "submit"])
def test_an_allowed_check_that_cannot_be_loaded_exits_2_naming_the_task_and_field(tmp_path: Path, verb: str) -> None:
    job = _bad_check_job(tmp_path)
    proc = cli(verb, str(job), "--allow-check", "nosuchmod:fn",
               env=_env(ORCH_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    assert proc.returncode == 2
    assert (f"{job}: task 'x': field 'spec.check': cannot load check 'nosuchmod:fn': No module named 'nosuchmod'"
            in proc.stderr)
    no_traceback(proc)


# -- liveness: a capability nobody serves ----------------------------------------------------------------


@pytest.mark.redis
def test_a_capability_no_worker_serves_is_named_at_submit_and_fails_the_task_after_no_worker_s(fleet: Fleet) -> None:
    typo = fleet.job("typo", "goal: typo\nbudget: {no_worker_s: 3}\ntasks:\n"
                             "  - id: t\n    capability: pyhton\n    instruction: result = 1\n")
    submitted = fleet.run("submit", str(typo))
    assert submitted.returncode == 0, submitted.stderr
    assert "no live worker serves capability 'pyhton' (tasks t)" in submitted.stderr
    run_id = submitted.stdout.strip()
    waiting = fleet.until(run_id, lambda s: s["tasks"][0]["waiting"] is not None)["tasks"][0]["waiting"]
    assert (waiting["for"], waiting["capability"]) == ("worker", "pyhton")
    ended = fleet.until(run_id, lambda s: s["state"] != "running")
    assert ended["state"] == "failed"
    assert "no live worker serves capability 'pyhton'" in ended["tasks"][0]["reason"]
    assert fleet.run("status", run_id).returncode == 1


@pytest.mark.redis
def test_a_served_capability_gets_no_warning(fleet: Fleet, runs: Runs) -> None:
    # ``runs`` finished a python task, so the module's worker has announced itself by now.
    ok = fleet.run("submit", str(fleet.job("served", ONE_TASK.format(goal="served", extra=""))))
    assert ok.returncode == 0, ok.stderr
    assert "no live worker" not in ok.stderr
