"""A stand-in python worker process for the sandbox escape tests: run snippets through ``PythonWorker``.

Run as ``python _sandbox_host.py`` (as root or as an unprivileged user) with the secrets a real
worker would hold in its environment. Reads ``{"config": {...}, "snippets": [{"code": ..., "args": ...}]}``
on stdin and prints one JSON object per snippet: ``ok``, ``value`` or ``error``, and the
``protections`` and ``measured`` the worker logged for it. Exits 3 with the reason when the
worker refuses to start.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from structlog.testing import capture_logs

from protocol.errors import ConfigError
from workers.base import Task
from workers.builtin import PythonWorker, SandboxError


async def _run(worker: PythonWorker, snippet: dict[str, Any]) -> dict[str, Any]:
    task = Task(run_id="r", task_id="t", attempt=1, capability="python", instruction="",
                input={"code": snippet["code"], "args": snippet.get("args")})
    with capture_logs() as logs:  # what the worker logs about the run: measured, never told by the snippet
        try:
            outcome: dict[str, Any] = {"ok": True, "value": await worker.handle(task)}
        except SandboxError as exc:
            outcome = {"ok": False, "error": str(exc)}
            if exc.result is not None:
                logs.append({"event": "snippet_finished", "protections": list(exc.result.protections),
                             "measured": exc.result.measured})
    finished = [e for e in logs if e["event"] == "snippet_finished"]
    outcome["protections"] = list(finished[-1]["protections"]) if finished else []
    outcome["measured"] = finished[-1]["measured"] if finished else {}
    return outcome


async def main() -> None:
    """Run every snippet of the job on stdin, one JSON line each on stdout."""
    job = json.loads(sys.stdin.read())
    try:
        worker = PythonWorker(job.get("config", {}))
    except ConfigError as exc:
        print(json.dumps({"refused": str(exc)}), flush=True)
        raise SystemExit(3) from None
    for snippet in job["snippets"]:
        print(json.dumps(await _run(worker, snippet), default=str), flush=True)


if __name__ == "__main__":
    anyio.run(main)
