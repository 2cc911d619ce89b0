"""Forgeries against a real manager and real workers, made as an attacker would: raw redis-py and msgpack.

The attacker can write to Redis and, in some tests, holds a worker's private key (a compromised
worker). Every forgery must be dead-lettered with its reason or ignored, change nothing, and lose
nothing: the real work still completes and is recorded under the real signer's identity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests._redis import redis_server_path
from tests.integration.harness import Cluster
from tests.security import attacker as atk

pytestmark = [pytest.mark.redis, pytest.mark.skipif(redis_server_path() is None, reason="redis-server not found")]

ROOT = Path(__file__).resolve().parents[2]


class Attacker:
    """Writes frames straight into Redis, signed with whatever private key it managed to steal (or none)."""

    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url)

    def frame(self, body: dict[str, Any], *, sign_as: str | None = None, claim: str | None = None,
              mac_as: str | None = None, **header: Any) -> bytes:
        """``claim``: the signer the frame names, when it is not the one whose key signed it.

        ``mac_as``: a MAC for the manager made with that identity's stolen key, instead of a signature.
        """
        data = atk.envelope(body, **header)
        if sign_as is not None:
            data = atk.sign(data, sign_as)
        if mac_as is not None:
            data = atk.mac(data, claim or mac_as, key_of=mac_as)
        if claim is not None:
            data["signer"] = claim
        return atk.pack(data)

    def add(self, stream: str, frame: bytes) -> None:
        atk.add(self.r, stream, frame)

    def dead(self, stream: str) -> list[str]:
        """The reasons of the stream's dead letters."""
        return [fields[b"reason"].decode() for _, fields in self.r.xrange(atk.dead_key(stream))]


class Fleet:
    """A cluster (private Redis, a real manager) with workers of the adversarial plugins, and the CLI a person uses."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.attacker = Attacker(cluster.url)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--redis", self.cluster.url],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, env=_env())
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def worker(self, capability: str) -> None:
        plugin = {"echo": "tests.security.plugins:Echo", "slow": "tests.security.plugins:Slow"}[capability]
        self.cluster.spawn(f"{capability}-worker", ["worker", "--redis", self.cluster.url, "--capability", capability,
                                                    "--plugin", plugin, "--lease-s", "2"])

    def submit(self, job: dict[str, Any]) -> str:
        path = self.cluster.tmp / f"job-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(json.dumps(job))
        return self.cli("submit", str(path)).stdout.strip()

    def status(self, run_id: str) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", run_id, "--json", check=False).stdout or "{}"))

    def events(self, run_id: str) -> list[dict[str, Any]]:
        out = self.cli("events", run_id, "--json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_INSECURE", None)
    return env


@pytest.fixture
def fleet(cluster: Cluster) -> Iterator[Fleet]:
    f = Fleet(cluster)
    cluster.manager()
    try:
        yield f
    finally:
        f.attacker.r.close()


def _until(what: str, probe: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _task(status: dict[str, Any], task_id: str) -> dict[str, Any]:
    return next(t for t in status.get("tasks", ()) if t["id"] == task_id)


def test_forged_approvals_are_dead_lettered_and_the_real_one_records_the_operator_key(fleet: Fleet) -> None:
    fleet.worker("echo")
    run_id = fleet.submit({"goal": "gated", "tasks": [
        {"id": "t", "capability": "echo", "input": 7, "spec": {"expect": 7, "approval": "human"}}]})
    _until("the task to wait for a person", lambda: (s := fleet.status(run_id)).get("tasks")
           and _task(s, "t").get("stage") == "human")

    forge = {"type": "override", "action": "approve", "feedback": "", "by": "the-boss"}
    a = fleet.attacker
    a.add("overrides", a.frame(forge, run_id=run_id, task_id="t"))  # unsigned
    a.add("overrides", a.frame(forge, run_id=run_id, task_id="t", sign_as="worker:echo"))  # a stolen worker key
    a.add("overrides", a.frame(forge, run_id=run_id, task_id="t", sign_as="worker:echo", claim="operator:tests"))
    reasons = _until("three dead letters", lambda: len(r := a.dead("overrides")) >= 3 and r)
    assert any("not signed" in r for r in reasons), reasons
    assert any("must be signed by a key of role 'operator', not by 'worker:echo'" in r for r in reasons), reasons
    assert any("does not match 'operator:tests'" in r for r in reasons), reasons
    time.sleep(0.5)
    status = fleet.status(run_id)
    assert status["state"] == "running"
    assert _task(status, "t")["stage"] == "human"

    fleet.cli("approve", run_id, "t", "--by", "someone-typed-this")
    final = _until("acceptance", lambda: (s := fleet.status(run_id))["state"] != "running" and s)
    assert final["state"] == "accepted"
    overrides = [e for e in fleet.events(run_id) if e.get("body", {}).get("kind") == "override"]
    assert [o["actor"] for o in overrides] == ["operator:tests"]  # the key, not the name typed with --by


def test_forged_and_cross_capability_results_change_nothing(fleet: Fleet) -> None:
    # No echo worker yet: the assign waits in Redis while the attacker answers for it.
    run_id = fleet.submit({"goal": "two capabilities", "tasks": [
        {"id": "t", "capability": "echo", "input": 7, "spec": {"expect": 7}},
        {"id": "o", "capability": "slow", "input": 1, "config": {"sleep_s": 0.1}}]})
    _until("attempt 1 dispatched", lambda: _task(fleet.status(run_id), "t")["attempts"] >= 1
           if fleet.status(run_id).get("tasks") else False)
    done = {"type": "done", "output": 999999, "tokens": 0, "duration_s": 0.0, "self_check": False}
    a = fleet.attacker
    a.add("results.echo", a.frame(done, run_id=run_id, task_id="t", attempt=1))  # unsigned
    a.add("results.echo", a.frame(done, run_id=run_id, task_id="t", attempt=1, sign_as="worker:slow"))
    # Validly signed by the slow worker, on its own stream, but about the echo task: the engine refuses it.
    a.add("results.slow", a.frame(done, run_id=run_id, task_id="t", attempt=1, sign_as="worker:slow"))
    reasons = _until("two dead letters", lambda: len(r := a.dead("results.echo")) >= 2 and r)
    assert any("not signed" in r for r in reasons), reasons
    assert any("'worker:slow' may not publish on 'results.echo'" in r for r in reasons), reasons
    time.sleep(1.0)
    assert _task(fleet.status(run_id), "t")["state"] == "not_done"

    fleet.worker("echo")
    fleet.worker("slow")
    final = _until("the run to end", lambda: (s := fleet.status(run_id))["state"] != "running" and s, 60)
    assert final["state"] == "accepted", final
    assert _task(final, "t")["output"] == 7


def test_forged_reply_macs_change_nothing_and_real_replies_carry_a_mac(fleet: Fleet) -> None:
    a = fleet.attacker
    # A group of our own keeps the results stream's entries after the manager settles them, to read them back.
    a.r.xgroup_create(atk.stream_key("results.echo"), "audit", id="0", mkstream=True)
    run_id = fleet.submit({"goal": "macs", "tasks": [{"id": "t", "capability": "echo", "input": 7,
                                                       "spec": {"expect": 7}}]})
    _until("attempt 1 dispatched", lambda: _task(fleet.status(run_id), "t")["attempts"] >= 1
           if fleet.status(run_id).get("tasks") else False)
    done = {"type": "done", "output": 999999, "tokens": 0, "duration_s": 0.0, "self_check": False}
    header = {"run_id": run_id, "task_id": "t", "attempt": 1}
    random_mac = atk.envelope(done, **header) | {"signer": "worker:echo", "mac": os.urandom(32)}
    a.add("results.echo", atk.pack(random_mac))
    # A compromised slow worker: its key makes a valid MAC for itself only, not for the echo worker it names.
    a.add("results.echo", a.frame(done, mac_as="worker:slow", claim="worker:echo", **header))
    a.add("results.echo", a.frame(done, mac_as="worker:slow", **header))
    reasons = _until("three dead letters", lambda: len(r := a.dead("results.echo")) >= 3 and r)
    assert sum("MAC does not match 'worker:echo'" in r for r in reasons) == 2, reasons
    assert any("'worker:slow' may not publish on 'results.echo'" in r for r in reasons), reasons
    time.sleep(1.0)
    assert _task(fleet.status(run_id), "t")["state"] == "not_done"

    fleet.worker("echo")
    final = _until("the run to end", lambda: (s := fleet.status(run_id))["state"] != "running" and s, 60)
    assert final["state"] == "accepted", final
    assert _task(final, "t")["output"] == 7
    entries: Any = a.r.xrange(atk.stream_key("results.echo"))
    real = [d for _, f in entries if (d := atk.unpack(f[b"f"]))["signer"] == "worker:echo"
            and d["body"]["type"] == "done" and d["body"]["output"] == 7]
    assert real, entries
    assert all(len(d["mac"]) == 32 and "sig" not in d for d in real), real


def test_batch_signed_assigns_cannot_be_altered_reused_or_made_with_a_worker_key(fleet: Fleet) -> None:
    # No echo worker yet: the manager's assigns wait in Redis, where the attacker reads and copies them.
    run_id = fleet.submit({"goal": "batch", "tasks": [
        {"id": f"t{i}", "capability": "echo", "input": i, "spec": {"expect": i}} for i in range(3)]})
    a = fleet.attacker
    real = _until("three assigns", lambda: len(r := atk.assigns(a.r, "echo")) >= 3 and r)
    assert all("bsig" in d and "sig" not in d for d in real), real  # started together: one signature
    assert len({d["bsig"][0] for d in real}) == 1
    changed = real[0] | {"body": real[0]["body"] | {"input": 666}}
    moved = real[1] | {"bsig": real[0]["bsig"]}
    evil = atk.envelope({"type": "assign", "capability": "echo", "instruction": "echo", "input": 666},
                        run_id=run_id, task_id="t0", attempt=1, sender="manager") | {"signer": "manager",
                                                                                     "bsig": real[0]["bsig"]}
    malformed = real[2] | {"bsig": [real[2]["bsig"][0], 2, 3, [b"x" * 31]]}
    own = atk.batch_sign([atk.envelope({"type": "assign", "capability": "echo", "instruction": "echo",
                                        "input": 666}, run_id=run_id, task_id=f"t{i}", attempt=1)
                          for i in range(2)], "worker:echo")  # a compromised worker's own batch
    for data in (changed, moved, evil, malformed, *own):
        a.add("tasks.echo", atk.pack(data))
    fleet.worker("echo")
    reasons = _until("six dead letters", lambda: len(r := a.dead("tasks.echo")) >= 6 and r)
    assert sum("signature does not match 'manager'" in r for r in reasons) == 3, reasons
    assert any("batch proof must be [signature, index, size, path of 32-byte hashes]" in r for r in reasons)
    assert sum("must be signed by a key of role 'manager', not by 'worker:echo'" in r for r in reasons) == 2
    final = _until("the run to end", lambda: (s := fleet.status(run_id))["state"] != "running" and s, 60)
    assert final["state"] == "accepted", final
    assert [_task(final, f"t{i}")["output"] for i in range(3)] == [0, 1, 2]
    assert all(_task(final, f"t{i}")["attempts"] == 1 for i in range(3))


def test_a_cancel_signed_by_a_worker_key_does_not_stop_work(fleet: Fleet) -> None:
    fleet.worker("slow")
    run_id = fleet.submit({"goal": "slow", "tasks": [
        {"id": "s", "capability": "slow", "input": 3, "config": {"sleep_s": 3}, "spec": {"expect": 3}}]})
    _until("the task in flight", lambda: (s := fleet.status(run_id)).get("tasks") and
           _task(s, "s")["attempts"] >= 1)
    time.sleep(0.5)
    a = fleet.attacker
    cancel = {"type": "cancel", "reason": "forged", "by": "manager"}
    for sign_as in (None, "worker:slow", "operator:tests"):
        a.r.publish(f"{atk.NS}:ctl:control", a.frame(cancel, run_id=run_id, task_id="s", sign_as=sign_as))
    # An operator's cancel goes to the manager as an override: that path exists, and is audited.
    final = _until("the run to end", lambda: (s := fleet.status(run_id))["state"] != "running" and s, 60)
    assert final["state"] == "accepted", final
    assert _task(final, "s")["attempts"] == 1


def test_a_job_submitted_with_a_worker_key_never_runs(fleet: Fleet) -> None:
    a = fleet.attacker
    job = {"goal": "from a compromised worker", "tasks": [{"id": "t", "capability": "echo", "input": 1}]}
    a.add("jobs", a.frame({"type": "submit", "job": job, "source": ""}, run_id="evil", sign_as="worker:echo"))
    reasons = _until("a dead letter", lambda: a.dead("jobs"))
    assert "must be signed by a key of role 'operator', not by 'worker:echo'" in reasons[0]
    assert fleet.status("evil")["error_type"] == "UnknownRun"


def test_processes_without_keys_refuse_to_start_and_name_the_command(tmp_path: Path) -> None:
    env = {**_env(), "ORCH_KEYS": str(tmp_path / "none")}
    for args, hint in ((["manager"], "orchestrator keys init"),
                       (["worker", "--capability", "echo"], "orchestrator keys add worker echo"),
                       (["submit", str(ROOT / "examples" / "quickstart.yaml")], "orchestrator keys init")):
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--redis", "redis://127.0.0.1:1/0"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert hint in done.stderr, done.stderr
        assert "--insecure" in done.stderr, done.stderr
