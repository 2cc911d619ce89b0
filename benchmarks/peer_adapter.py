"""This project's adapters for the peer harness (``../shared/peers``; see its README).

The harness's ``peer_orchestrator.py`` loads ``Adapter`` from here when setup.sh recorded this
checkout, and calls ``Adapter(variant)``:

- ``default``: the bus and the worker runtime, what the peers offer. One ``RedisBus.publish``
  of an ``Assign`` envelope per task (one awaited call, like every peer); the real
  ``orchestrator worker`` process with the harness's no-op plugin; replies read from
  ``results.noop`` by a background consumer in group ``manager``, which resolves a future per
  task and acknowledges in batches. No ledger, no verification.
- ``lifecycle``: the whole product. An ``Orchestrator`` on Redis with its manager and SQLite
  ledger (WAL, ``synchronous=FULL``) in the client process and no hosted workers; each submitted
  task is a one-task job whose spec ``expect``s the no-op's answer, and each wait is that run's
  acceptance (the output comes from the accepted run's record). Same worker process as above.
- ``unsigned``: ``default`` with signing off (both sides ``--insecure``), as the row
  ``orchestrator-unsigned``: what the signature costs, measured in the same run as the signed row.

The variant comes from the harness's ``--variant`` or, so that the shared ``run_all.sh`` can run
it unchanged, from ``ORCH_PEER_ADAPTER=lifecycle``.

``benchmarks/peers.sh`` runs these rows beside the peers in one run. ``ORCH_INSECURE=1`` turns signing
off for every row (unsigned bus messages, where signing is the default on Redis): both sides then run
with ``--insecure``; otherwise each adapter makes a keyring of its own (the manager's key and
``worker:noop``): assigns are signed and verified, and replies carry a MAC for the manager
(``ORCH_SIGN_REPLIES=1``: signed too, as before 2026-12-03).
"""

import asyncio
import contextlib
import os
import sys
import tempfile
import uuid

import anyio

from protocol.envelope import Envelope
from protocol.messages import Assign
from protocol.redis_bus import RedisBus

NS = "benchorch"


def _orchestrator_cli() -> str:
    return os.path.join(os.path.dirname(sys.executable), "orchestrator")


def _keyring(unsigned: bool = False):
    """A fresh keyring with the manager's and the no-op worker's keys, or None (unsigned, or ORCH_INSECURE=1)."""
    from orchestrator.trust import insecure_from_env
    from protocol.keyring import Keyring

    if unsigned or insecure_from_env():
        return None
    ring = Keyring.init(tempfile.mkdtemp(prefix="peer-keys-"))
    ring.add("worker", "noop")
    return ring


def _worker_argv(url, ring):
    keys = ["--insecure"] if ring is None else ["--keys", str(ring.path)]
    return [_orchestrator_cli(), "worker", "--redis", url, "--namespace", NS, "--capability", "noop",
            "--plugin", "orch_noop:Noop", "--concurrency", "256", *keys]


def _signed(ring) -> str:
    from orchestrator.trust import sign_replies_from_env

    if ring is None:
        return "unsigned (--insecure)"
    return "Ed25519-signed" if sign_replies_from_env() else "signed, replies MAC'd"


class BusAdapter:
    system = "orchestrator"
    mode = "async"

    def __init__(self, variant: str):
        self.variant = variant
        self.ring = _keyring(unsigned=variant == "unsigned")
        self.label = f"orchestrator RedisBus + WorkerRuntime (this project, {_signed(self.ring)})"
        if variant == "unsigned":
            self.system = "orchestrator-unsigned"

    def worker_argv(self, url):
        return _worker_argv(url, self.ring)

    def notes(self):
        return {
            "worker": "1 process, orchestrator worker (anyio), concurrency 256, leases + fenced Lua commit",
            "queue": "tasks.noop stream + consumer group (project's RedisBus)",
            "result_wait": "results.noop consumed by group 'manager' in a background task (push), acks batched",
            "serializer": "msgpack envelope, strict pydantic decode",
        }

    async def setup(self, url):
        from orchestrator.trust import Trust
        from protocol.bus import BusSettings

        codec = Trust(self.ring, ("manager",)).codec()  # the client plays the manager: it sends assigns
        self.bus = RedisBus.from_url(url, namespace=NS, settings=BusSettings(codec=codec))
        await self.bus.__aenter__()
        self.pending: dict[str, asyncio.Future] = {}
        self.run = uuid.uuid4().hex
        self.unacked: list = []
        self.wake = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read())
        self.acker = asyncio.ensure_future(self._ack())

    async def _read(self):
        async for d in self.bus.consume("results.noop", group="manager", consumer="bench"):
            fut = self.pending.pop(d.envelope.task_id, None)
            if fut is not None and not fut.done():
                fut.set_result(d.envelope.body.output)
            self.unacked.append(d)
            self.wake.set()

    async def _ack(self):
        # What the manager does too: acknowledge what arrived meanwhile in one call.
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.unacked = self.unacked, []
            await self.bus.ack_many(batch)

    async def submit(self, payload):
        tid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self.pending[tid] = fut
        env = Envelope(run_id=self.run, task_id=tid, attempt=1,
                       body=Assign(capability="noop", instruction="noop", input=payload))
        await self.bus.publish("tasks.noop", env)
        return fut

    async def wait(self, fut, timeout_s):
        with anyio.fail_after(timeout_s):  # raises TimeoutError, as the harness expects
            return await fut

    async def close(self):
        # measurements are done by now; never let teardown hang the harness
        for task in (self.reader, self.acker):
            task.cancel()
        with anyio.move_on_after(5):
            await asyncio.wait([self.reader, self.acker])
        with anyio.move_on_after(5), contextlib.suppress(Exception):
            await self.bus.aclose()


class LifecycleAdapter:
    system = "orchestrator-lifecycle"
    mode = "async"

    def __init__(self, variant: str):
        self.variant = variant
        self.ring = _keyring()
        self.label = f"orchestrator full lifecycle (manager + ledger + spec check, this project, {_signed(self.ring)})"

    def worker_argv(self, url):
        return _worker_argv(url, self.ring)

    def notes(self):
        return {
            "worker": "1 process, orchestrator worker (anyio), concurrency 256, leases + fenced Lua commit",
            "queue": "one-task job per task: manager dispatch, worker, done, spec expect check, accept",
            "result_wait": "Run.wait(): the run's acceptance, after the SQLite ledger's group commit (fsync)",
            "serializer": "msgpack envelope, strict pydantic decode; ledger JSON rows",
        }

    async def setup(self, url):
        # Imported here: the bus-only row must not pay for the manager's imports.
        from orchestrator.api import Orchestrator
        from orchestrator.gctune import tune_gc
        from orchestrator.ledger import SQLiteStore

        tune_gc()  # what the manager process does at start
        self.tmp = tempfile.mkdtemp(prefix="peer-ledger-")
        self.orch = Orchestrator(bus=RedisBus.from_url(url, namespace=NS),
                                 store=SQLiteStore(os.path.join(self.tmp, "ledger.db")), host_workers=False,
                                 keys=self.ring, insecure=self.ring is None)
        await self.orch.__aenter__()

    async def submit(self, payload):
        from payload import expected_result

        job = {"goal": "peer benchmark", "tasks": [
            {"id": "t", "capability": "noop", "instruction": "noop", "input": payload,
             "spec": {"expect": expected_result(payload)}}]}
        return await self.orch.submit(job)

    async def wait(self, run, timeout_s):
        with anyio.fail_after(timeout_s):
            result = await run.wait()
        if not result.accepted:
            raise AssertionError(f"run {result.run_id} ended {result.state}: {result.reason}")
        return result.outputs["t"]

    async def close(self):
        # Not under a timeout scope of our own: the orchestrator's task group was entered in setup(),
        # and anyio's scopes must be left in the order they were entered.
        with contextlib.suppress(Exception):
            await self.orch.__aexit__(None, None, None)


def Adapter(variant: str):  # the harness calls Adapter(variant)
    """The adapter for ``variant`` (or ``ORCH_PEER_ADAPTER`` when the harness passes ``default``)."""
    if variant == "default":
        variant = os.environ.get("ORCH_PEER_ADAPTER", "default")
    if variant == "lifecycle":
        return LifecycleAdapter(variant)
    if variant in ("default", "unsigned"):
        return BusAdapter(variant)
    raise ValueError(f"unknown orchestrator variant {variant!r} (default, unsigned or lifecycle)")
