"""Big jobs end to end on Redis: the manager's peak memory and the ledger's size as a run grows.

Run from the repository root::

    python benchmarks/scale.py                                  # 1,000, 10,000 and 100,000 tasks, 3 workers
    python benchmarks/scale.py --tasks 2000 --workers 2 --form python

For each size, in a fresh child process (so its peak RSS belongs to that size alone), an
``Orchestrator`` on Redis with its SQLite ledger and no hosted workers runs one job of
independent no-op tasks, each with a spec ``expect`` check; ``--workers`` separate
``orchestrator worker`` processes (``benchmarks/noop.py``, concurrency 256) do the work. The job
is either a YAML file the child loads (``--form file``, what a person writes) or a ``Job`` built
in Python (``--form python``); ``both`` (the default) runs the file at every size and the
Python-built job at the largest. ``--form submit`` runs the deployed shape instead: an
``orchestrator manager`` process, and the YAML file sent to it with ``orchestrator submit FILE
--wait --json`` (staged on Redis past 256 KiB, docs/bus.md); it also reports the ``submit``
process's CPU time and peak memory. The run must end ``accepted``. Bus messages are signed (a
keyring made for the benchmark) unless ``ORCH_INSECURE=1``.

With ``SCALE_RSS_CURVE=1`` each run also prints the manager's resident memory every half second
(from submit's process start), to show where in the run the peak is. With ``SCALE_LOOP_PAUSES=1``
it prints the longest pauses of the manager's event loop (a task sleeping 20 ms beside the run
measures how late it wakes), to show what the run holds the loop for.

Reported per run: tasks/s from submit to acceptance; the manager process's peak resident memory
(``VmHWM``), its resident memory before the job existed, and the difference per task; the
ledger's size on disk (database plus write-ahead log, after the run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INPUT = "x" * 64


def _status_kb(field: str) -> int:
    return _field_kb(Path("/proc/self/status"), field)


def _write_job_file(path: Path, n: int) -> None:
    # Written by hand, as a person's file would be: no budget.max_tasks.
    with path.open("w") as f:
        f.write(f"goal: scale benchmark, {n} tasks\n")
        f.write("budget:\n  deadline_s: 3600\n")
        f.write("tasks:\n")
        for i in range(n):
            f.write(f"  - id: t{i}\n    capability: noop\n    instruction: noop\n    input: {INPUT}\n"
                    f"    spec: {{expect: {INPUT}}}\n")


def _python_job(n: int):  # type: ignore[no-untyped-def]
    from orchestrator.job import Job, Spec, TaskDef

    return Job(goal=f"scale benchmark, {n} tasks", tasks=tuple(
        TaskDef(id=f"t{i}", capability="noop", instruction="noop", input=INPUT, spec=Spec(expect=INPUT))
        for i in range(n)))


def child(url: str, ns: str, n: int, form: str, tmp: str, keys: str, workers: int) -> None:
    """One run in this (fresh) process; prints a JSON line with the figures."""
    import anyio

    from orchestrator.api import Orchestrator
    from orchestrator.gctune import tune_gc
    from orchestrator.ledger import SQLiteStore
    from protocol.logging import configure_logging
    from protocol.redis_bus import RedisBus

    configure_logging("WARNING")
    tune_gc()  # as the manager process does
    curve: list[tuple[float, int]] = []
    pauses: list[tuple[float, float]] = []
    if os.environ.get("SCALE_RSS_CURVE"):
        _sample_rss(curve)
    ledger = Path(tmp) / f"{ns}.db"
    job_file = Path(tmp) / f"{ns}.yaml"
    if form == "file":
        _write_job_file(job_file, n)

    async def main() -> dict[str, object]:
        await _until_workers_announce(url, ns, workers)
        async with Orchestrator(bus=RedisBus.from_url(url, namespace=ns), store=SQLiteStore(ledger),
                                host_workers=False, keys=keys or None, insecure=not keys) as orch:
            rss_before = _status_kb("VmRSS")
            start = time.perf_counter()
            job = orch.load(job_file) if form == "file" else _python_job(n)
            async with anyio.create_task_group() as tg:
                if os.environ.get("SCALE_LOOP_PAUSES"):
                    tg.start_soon(_watch_pauses, pauses, start)
                run = await orch.submit(job)
                del job
                result = await run.wait()
                tg.cancel_scope.cancel()
            elapsed = time.perf_counter() - start
            if not result.accepted:
                raise SystemExit(f"run ended {result.state}: {result.reason}")
            accepted = sum(t.state == "accepted" for t in result.record.tasks.values())
        ledger_bytes = sum(p.stat().st_size for p in ledger.parent.glob(ledger.name + "*"))
        return {"tasks": n, "form": form, "accepted": accepted, "seconds": round(elapsed, 2),
                "tasks_per_s": round(n / elapsed), "rss_before_kb": rss_before, "peak_rss_kb": _status_kb("VmHWM"),
                "ledger_bytes": ledger_bytes, "rss_curve": curve,
                "loop_pauses": sorted(pauses, key=lambda p: -p[1])[:8]}

    print(json.dumps(anyio.run(main)), flush=True)


async def _until_workers_announce(url: str, ns: str, workers: int, timeout_s: float = 60.0) -> None:
    """Wait until the worker processes serve ``noop``, so the run measures work, not their start-up.

    A run submitted before they announce themselves records, truthfully, that each task of its
    first dispatch window waits for a worker and then moves (20,000 more history events at 100,000
    tasks), which the ledger's size per task would count.
    """
    import anyio

    from protocol.redis_bus import RedisBus

    async with RedisBus.from_url(url, namespace=ns) as bus:
        with anyio.fail_after(timeout_s):
            # Polled: presence lives in Redis, written by other processes; there is nothing to wait on here.
            while (await bus.served(["noop"]))["noop"] < workers:  # noqa: ASYNC110
                await anyio.sleep(0.1)


async def _watch_pauses(pauses: list[tuple[float, float]], start: float, every_s: float = 0.02) -> None:
    """Append (seconds since the job began to be built, pause in seconds) whenever the loop wakes a sleeper 0.1 s late."""
    import anyio

    while True:
        asleep = time.perf_counter()
        await anyio.sleep(every_s)
        late = time.perf_counter() - asleep - every_s
        if late > 0.1:
            pauses.append((round(asleep - start, 2), round(late, 3)))


def _sample_rss(curve: list[tuple[float, int]], every_s: float = 0.5, status: Path = Path("/proc/self/status")) -> None:
    """Append (seconds, RSS KiB) to ``curve`` from a daemon thread: where in a run the peak is."""
    import threading

    start = time.perf_counter()

    def sample() -> None:
        while True:
            try:
                curve.append((round(time.perf_counter() - start, 1), _field_kb(status, "VmRSS")))
            except FileNotFoundError:  # the process has ended
                return
            time.sleep(every_s)

    threading.Thread(target=sample, daemon=True).start()


def submitted(url: str, ns: str, n: int, tmp: str, keys: str, workers: int) -> dict[str, object]:
    """One run of the job file sent with ``orchestrator submit`` to an ``orchestrator manager`` process."""
    import anyio

    from orchestrator.processes import active_manager

    ledger = Path(tmp) / f"{ns}.db"
    job_file = Path(tmp) / f"{ns}.yaml"
    _write_job_file(job_file, n)
    orch = str(Path(sys.executable).with_name("orchestrator"))
    common = ["--redis", url, "--namespace", ns, *(["--keys", keys] if keys else ["--insecure"])]
    manager = subprocess.Popen([orch, "--log-level", "WARNING", "manager", *common, "--ledger", str(ledger)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def ready() -> None:
            await _until_workers_announce(url, ns, workers)
            with anyio.fail_after(60):
                while await active_manager(url, namespace=ns) is None:  # noqa: ASYNC110 (another process's lease)
                    await anyio.sleep(0.1)

        anyio.run(ready)
        time.sleep(1.0)  # let the manager's start-up garbage settle before its baseline
        status = Path(f"/proc/{manager.pid}/status")
        rss_before = _field_kb(status, "VmRSS")
        curve: list[tuple[float, int]] = []
        if os.environ.get("SCALE_RSS_CURVE"):
            _sample_rss(curve, status=status)
        out_path, err_path = Path(tmp) / f"{ns}.out", Path(tmp) / f"{ns}.err"
        start = time.perf_counter()
        # Files, not pipes: nothing reads a pipe while wait4 waits, so a chatty client would block on it.
        with out_path.open("w") as out, err_path.open("w") as err:
            client = subprocess.Popen([orch, "--log-level", "WARNING", "submit", *common, str(job_file), "--wait",
                                       "--json"], stdout=out, stderr=err)
            _, wait_status, usage = os.wait4(client.pid, 0)
        elapsed = time.perf_counter() - start
        client.returncode = os.waitstatus_to_exitcode(wait_status)
        peak = _field_kb(status, "VmHWM")
        if client.returncode != 0:
            raise SystemExit(f"orchestrator submit exited {client.returncode}: {err_path.read_text()[-2000:]}")
        result = json.loads(out_path.read_text())
    finally:
        manager.terminate()
        manager.wait(60)
    accepted = sum(t["state"] == "accepted" for t in result["tasks"])
    if accepted != n:
        raise SystemExit(f"run ended {result['state']} with {accepted} of {n} tasks accepted: {result['reason']}")
    ledger_bytes = sum(p.stat().st_size for p in ledger.parent.glob(ledger.name + "*"))
    return {"tasks": n, "form": "submit", "accepted": accepted, "seconds": round(elapsed, 2),
            "tasks_per_s": round(n / elapsed), "rss_before_kb": rss_before, "peak_rss_kb": peak,
            "ledger_bytes": ledger_bytes, "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "client_peak_rss_kb": usage.ru_maxrss, "rss_curve": list(curve), "loop_pauses": []}


def _field_kb(status: Path, field: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _keyring(tmp: str) -> str:
    """A keyring with the manager's and the no-op worker's keys ('' with ORCH_INSECURE=1: unsigned)."""
    from orchestrator.trust import insecure_from_env
    from protocol.keyring import Keyring

    if insecure_from_env():
        return ""
    ring = Keyring.init(Path(tmp) / "keys")
    ring.add("worker", "noop")
    return str(ring.path)


def _workers(url: str, ns: str, count: int, keys: str) -> list[subprocess.Popen[bytes]]:
    orch = Path(sys.executable).with_name("orchestrator")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), env_path()]))
    trust = ["--keys", keys] if keys else ["--insecure"]
    return [subprocess.Popen([str(orch), "--log-level", "WARNING", "worker", "--redis", url, "--namespace", ns,
                              "--capability", "noop", "--plugin", "noop:NoopWorker", "--concurrency", "256",
                              *trust],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(count)]


def env_path() -> str:
    return os.environ.get("PYTHONPATH", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing Redis (default: start a throwaway redis-server)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--form", choices=("file", "python", "both", "submit"), default="both")
    parser.add_argument("--child", nargs=6, metavar=("NS", "N", "FORM", "TMP", "KEYS", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ns, n, form, tmp, keys, workers = args.child
        child(args.url, ns, int(n), form, tmp, keys, int(workers))
        return
    from tests._redis import given_or_throwaway

    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    keys = _keyring(tmp)
    plan = [(n, "file" if args.form == "both" else args.form) for n in args.tasks]
    if args.form == "both":
        plan.append((max(args.tasks), "python"))
    rows = []
    with given_or_throwaway(args.url) as (url, _):
        for n, form in plan:
            ns = f"scale{uuid.uuid4().hex[:8]}"
            workers = _workers(url, ns, args.workers, keys)
            try:
                if form == "submit":
                    row = submitted(url, ns, n, tmp, keys, args.workers)
                    rows.append(_report(row, n, form))
                    continue
                out = subprocess.run([sys.executable, __file__, "--url", url, "--child", ns, str(n), form, tmp, keys,
                                      str(args.workers)],
                                     capture_output=True, text=True, check=False)
            finally:
                for w in workers:
                    w.terminate()
                for w in workers:
                    w.wait(30)
            if out.returncode != 0:
                print(out.stdout, out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the {n}-task run failed")
            rows.append(_report(json.loads(out.stdout.strip().splitlines()[-1]), n, form))


def _report(row: dict, n: int, form: str) -> dict:  # type: ignore[type-arg]
    row["kb_per_task"] = round((row["peak_rss_kb"] - row["rss_before_kb"]) / n, 3)
    print(f"{n:>7} tasks ({form:6}): {row['tasks_per_s']:>6} tasks/s, manager peak RSS "
          f"{row['peak_rss_kb'] / 1024:7.1f} MiB (before the job {row['rss_before_kb'] / 1024:.1f} MiB, "
          f"{row['kb_per_task'] * 1024:6.0f} bytes/task), ledger {row['ledger_bytes'] / 1e6:7.1f} MB "
          f"({row['ledger_bytes'] / n:.0f} bytes/task)", flush=True)
    if "client_cpu_s" in row:
        print(f"  orchestrator submit: {row['client_cpu_s']} s of CPU, peak RSS "
              f"{row['client_peak_rss_kb'] / 1024:.0f} MiB", flush=True)
    if row["loop_pauses"]:
        print("  longest event-loop pauses (s into the run: s): "
              + ", ".join(f"{at:g}: {late:.2f}" for at, late in row["loop_pauses"]))
    if row["rss_curve"]:
        print("  RSS (s: MiB): " + ", ".join(f"{t:g}: {kb / 1024:.0f}" for t, kb in row["rss_curve"]))
    return row


if __name__ == "__main__":
    main()
