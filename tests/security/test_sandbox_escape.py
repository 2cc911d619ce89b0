"""Snippets that try to get out of the ``python`` worker's sandbox, as root and as an unprivileged worker.

Each attack runs in a real worker process (``_sandbox_host.py``) that holds a secret Redis URL in
its environment, next to a real redis-server, a file the worker owns and a world-writable one.
Every attack must be refused, the secret must not leak, the files must not change, and the same
worker must still run a normal snippet afterwards. Where this machine cannot give the
unprivileged worker a user namespace, its tests skip with the worker's own reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from protocol.errors import ConfigError
from tests._redis import RedisServer, redis_server_path
from workers.builtin import PythonWorker

ROOT = Path(__file__).resolve().parents[2]
HOST = Path(__file__).with_name("_sandbox_host.py")
WITHOUT_NAMESPACES = Path(__file__).with_name("_without_namespaces.py")
SECRET = "hunter2-sandbox-secret"
UNPRIVILEGED = 4242  # a uid and gid with no account and no files of their own
pytestmark = [pytest.mark.timeout(120), pytest.mark.redis,
              pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only"),
              pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not on PATH")]


@dataclass
class Target:
    """What the snippets attack: the worker's pid comes at run time; the rest is set up here."""

    redis_port: int
    owned_file: Path  # belongs to the worker's uid, mode 0644
    shared_file: Path  # mode 0666


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="orch-escape-redis-"))).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


def _interpreter_for(uid: int) -> str | None:
    """An interpreter of this Python version that ``uid`` can run with this checkout's packages, or None."""
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{minor}", f"/usr/local/bin/{minor}"):
        if not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run([candidate, "-c", "import anyio, pydantic, structlog, workers.builtin"],
                                   env=_host_env(), cwd=ROOT, user=uid, group=uid, extra_groups=[],
                                   capture_output=True, timeout=60, check=False)
        except OSError:
            continue  # not executable for uid (e.g. an interpreter under root's home)
        if probe.returncode == 0:
            return candidate
    return None


def _site_packages() -> str:
    return str(Path(anyio.__file__).resolve().parents[1])


def _host_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
            "PYTHONPATH": os.pathsep.join([str(ROOT), _site_packages()]),
            "ORCH_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:6379/0", "ORCH_LLM_API_KEY": SECRET}


@dataclass
class Host:
    """How to start the stand-in worker: as whom, with which interpreter, without namespaces or not."""

    uid: int
    python: str
    without_namespaces: bool = False

    def start(self, snippets: list[dict[str, Any]], config: dict[str, Any] | None) -> subprocess.CompletedProcess[str]:
        job = json.dumps({"config": config or {}, "snippets": snippets})
        argv = [self.python, str(HOST)]
        as_user: dict[str, Any] = {}
        if self.without_namespaces:
            argv = [sys.executable, str(WITHOUT_NAMESPACES), str(self.uid), "--", *argv]
        elif self.uid != os.geteuid():
            as_user = {"user": self.uid, "group": self.uid, "extra_groups": []}
        return subprocess.run(argv, input=job, capture_output=True, text=True, cwd=ROOT, env=_host_env(), timeout=90,
                              check=False, **as_user)

    def refusal(self, config: dict[str, Any] | None = None) -> str:
        """Why the worker refused to start (fails the test when it started)."""
        done = self.start([], config)
        assert done.returncode == 3, (done.returncode, done.stdout, done.stderr[-2000:])
        return str(json.loads(done.stdout.splitlines()[0])["refused"])

    def run(self, snippets: list[dict[str, Any]], config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        done = self.start(snippets, config)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 3 and lines and "refused" in lines[0]:
            pytest.skip(f"the python worker refuses to start here as uid {self.uid}: {lines[0]['refused']}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(lines) == len(snippets), done.stderr[-3000:]
        return lines


@pytest.fixture(params=["root", "unprivileged"])
def host(request: pytest.FixtureRequest) -> Host:
    if os.geteuid() != 0:
        if request.param == "root":
            pytest.skip("needs root: the root-worker case drops to nobody")
        return Host(os.geteuid(), sys.executable)  # already unprivileged
    if request.param == "root":
        return Host(0, sys.executable)
    python = _interpreter_for(UNPRIVILEGED)
    if python is None:
        pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} that uid {UNPRIVILEGED} may run "
                    "with this checkout's packages")
    return Host(UNPRIVILEGED, python)


@pytest.fixture
def target(host: Host, redis: RedisServer) -> Iterator[Target]:
    home = Path(tempfile.mkdtemp(prefix="orch-escape-"))
    home.chmod(0o755)
    owned, shared = home / "worker-state.txt", home / "shared.txt"
    owned.write_text("the worker's own state\n")
    shared.write_text("anyone may write here\n")
    owned.chmod(0o644)
    shared.chmod(0o666)
    for path in (home, owned, shared):
        os.chown(path, host.uid, host.uid)
    try:
        yield Target(redis.port, owned, shared)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def snippet(code: str, **args: Any) -> dict[str, Any]:
    return {"code": textwrap.dedent(code), "args": args}


# The worker's pid is what an attacker would look for; the host is the sandbox launcher's parent.
FIND_WORKER = """
import os
def worker_pids():
    pids = {os.getppid(), 1}
    for name in os.listdir("/proc"):
        if name.isdigit():
            pids.add(int(name))
    return sorted(pids)
"""

READ_ENVIRON = FIND_WORKER + """
leaks, errors = [], []
for pid in worker_pids():
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError as exc:
        errors.append(type(exc).__name__)
        continue
    if b"ORCH_REDIS_URL" in data or task_input["secret"].encode() in data:
        leaks.append(pid)
import os as _os
result = {"leaks": leaks, "errors": sorted(set(errors)), "own_env": dict(_os.environ), "pids": worker_pids()}
"""

SOCKETS = """
import socket, _socket, subprocess, sys
port = task_input["port"]
outcomes = {}
def attempt(name, make):
    try:
        s = make()
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
        s.sendall(b"PING\\r\\n")
        outcomes[name] = "connected: " + s.recv(64).decode(errors="replace")
    except BaseException as exc:
        outcomes[name] = "refused: " + type(exc).__name__ + ": " + str(exc)
attempt("bases", lambda: socket.socket.__bases__[0](socket.AF_INET, socket.SOCK_STREAM))
attempt("_socket", lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM))
probe = (f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=2); "
         "s.sendall(b'PING\\\\r\\\\n'); print(s.recv(64))")
child = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True)
outcomes["child_python"] = ("connected: " + child.stdout) if child.returncode == 0 else "refused: " + child.stderr[-200:]
result = outcomes
"""

SETNS = FIND_WORKER + """
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
joined = []
for pid in worker_pids():
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    except OSError:
        continue
    if libc.setns(fd, CLONE_NEWNET) == 0:
        joined.append(pid)
    os.close(fd)
# Also try to reach the host's /proc by mounting a fresh one, and by unmounting ours.
mounted = libc.mount(b"proc", b"/tmp", b"proc", 0, None) == 0 or libc.umount2(b"/proc", 2) == 0
try:
    s = socket.socket.__bases__[0](socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(("127.0.0.1", task_input["port"]))
    reached = True
except OSError:
    reached = False
result = {"joined": joined, "mounted": mounted, "reached": reached}
"""

WRITE_FILES = """
import os
outcomes = {}
for name, path in [("owned", task_input["owned"]), ("shared", task_input["shared"]),
                   ("new_in_tmp", "/tmp/orch-escape-created"), ("new_in_dev_shm", "/dev/shm/orch-escape-created"),
                   ("new_next_to_owned", os.path.join(os.path.dirname(task_input["owned"]), "planted"))]:
    try:
        with open(path, "a") as f:
            f.write("written by the snippet\\n")
        outcomes[name] = "written"
    except OSError as exc:
        outcomes[name] = "refused: " + type(exc).__name__
try:
    os.chmod(task_input["owned"], 0o777)
    outcomes["chmod"] = "changed"
except OSError as exc:
    outcomes["chmod"] = "refused: " + type(exc).__name__
with open("mine.txt", "w") as f:  # the work directory stays writable
    f.write("ok")
outcomes["workdir"] = open("mine.txt").read()
result = outcomes
"""

FORGE = """
import json, os
lines = (json.dumps({"kind": "ready", "protections": ["seccomp", "forged_protection"]}) + "\\n"
         + json.dumps({"kind": "done", "ok": True, "has_result": True, "result_json": json.dumps("forged"),
                       "error": None, "killed_by": None, "protections": ["forged_protection"]}) + "\\n")
written = []
for fd in range(3, 64):
    try:
        os.write(fd, lines.encode())
        written.append(fd)
    except OSError:
        pass
print(json.dumps({"kind": "ready", "protections": ["forged_protection"]}))
result = {"written_to": written}
"""

KILL_WORKER = FIND_WORKER + """
import signal
killed = []
for pid in worker_pids():
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
result = killed
"""


def test_every_escape_is_refused_and_the_worker_stays_healthy(host: Host, target: Target) -> None:
    with socket.create_connection(("127.0.0.1", target.redis_port), timeout=2):
        pass  # the same Redis is reachable from outside the sandbox: a refusal below is the sandbox's doing
    owned_before, shared_before = target.owned_file.read_text(), target.shared_file.read_text()
    environ, sockets, setns, writes, forge, healthy = host.run([
        snippet(READ_ENVIRON, secret=SECRET),
        snippet(SOCKETS, port=target.redis_port),
        snippet(SETNS, port=target.redis_port),
        snippet(WRITE_FILES, owned=str(target.owned_file), shared=str(target.shared_file)),
        snippet(FORGE),
        snippet("result = 6 * 7"),
    ])

    assert environ["ok"], environ
    assert environ["value"]["leaks"] == [], environ["value"]
    assert SECRET not in json.dumps(environ["value"]["own_env"])
    assert "ORCH_REDIS_URL" not in environ["value"]["own_env"]

    assert sockets["ok"], sockets
    for name, outcome in sockets["value"].items():
        assert outcome.startswith("refused"), (name, outcome)

    assert setns["ok"], setns
    assert setns["value"] == {"joined": [], "mounted": False, "reached": False}

    assert writes["ok"], writes
    assert writes["value"]["workdir"] == "ok"
    for name in ("owned", "shared", "new_in_tmp", "new_in_dev_shm", "new_next_to_owned", "chmod"):
        assert writes["value"][name].startswith("refused"), (name, writes["value"][name])
    assert target.owned_file.read_text() == owned_before
    assert target.shared_file.read_text() == shared_before
    assert (target.owned_file.stat().st_mode & 0o777) == 0o644
    assert not Path("/tmp/orch-escape-created").exists()
    assert not (target.owned_file.parent / "planted").exists()

    # What the worker logged was measured on the snippet's process, not taken from the snippet.
    assert forge["ok"], forge
    assert forge["value"]["written_to"], "the snippet found no channel to forge a report on"
    assert "forged_protection" not in forge["protections"]
    assert "seccomp" not in forge["protections"]
    for outcome in (environ, sockets, setns, writes, forge):
        assert {"no_capabilities", "no_new_privs", "net_namespace", "pid_namespace", "read_only_fs",
                "unprivileged_uid"} <= set(outcome["protections"]), outcome["protections"]
        assert all(uid == (65534 if host.uid == 0 else host.uid) for uid in outcome["measured"]["uids"])
        assert outcome["measured"]["groups"] == []
        assert outcome["measured"]["no_new_privs"] is True

    assert healthy == {"ok": True, "value": 42, "protections": healthy["protections"],
                       "measured": healthy["measured"]}


def test_a_snippet_cannot_kill_or_signal_its_worker(host: Host) -> None:
    killer, after = host.run([snippet(KILL_WORKER), snippet("result = 'still here'")])
    assert killer["ok"], killer
    # Inside its own PID namespace the only other process it can signal is its own init.
    assert set(killer["value"]) <= {1}
    assert after["ok"]
    assert after["value"] == "still here"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to build a namespace-less user for the worker")
def test_where_the_kernel_refuses_namespaces_the_worker_says_so_and_starts_only_when_told(
        redis: RedisServer) -> None:
    python = _interpreter_for(UNPRIVILEGED)
    if python is None:
        pytest.skip(f"no Python that uid {UNPRIVILEGED} may run with this checkout's packages")
    host = Host(UNPRIVILEGED, python, without_namespaces=True)
    reason = host.refusal()
    assert "the python worker refuses to start: the sandbox lacks net_namespace" in reason
    assert "no network namespace can be had here" in reason
    assert "allow_network_without_namespace: true" in reason

    # Told so, it starts, and the snippets have the network: the opt-out is what it says.
    [sockets] = host.run([snippet(SOCKETS, port=redis.port)], {"allow_network_without_namespace": True})
    assert sockets["ok"], sockets
    assert sockets["value"]["bases"].startswith("connected: +PONG"), sockets["value"]
    assert "net_namespace" not in sockets["protections"]
    assert "no_new_privs" in sockets["protections"]


def test_without_a_network_namespace_the_worker_refuses_to_start_unless_told() -> None:
    # net_namespace off stands in for a kernel that refuses one: the measured sandbox then has none.
    with pytest.raises(ConfigError) as info:
        PythonWorker({"net_namespace": False})
    assert "net_namespace" in str(info.value)
    assert "allow_network_without_namespace" in str(info.value)
    with capture_logs() as logs:
        worker = PythonWorker({"net_namespace": False, "allow_network_without_namespace": True})
    assert "net_namespace" not in worker.sandbox_protections
    assert any(e["event"] == "sandbox_without_network_namespace" and e["log_level"] == "warning" for e in logs)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root worker switches users")
def test_a_root_worker_refuses_to_run_snippets_as_root_or_as_nobody_it_cannot_find() -> None:
    with pytest.raises(ConfigError, match="snippets must not run as root"):
        PythonWorker({"sandbox_user": "root"})
    with pytest.raises(ConfigError, match="'no-such-account-here' does not exist"):
        PythonWorker({"sandbox_user": "no-such-account-here"})
