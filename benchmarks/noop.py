"""A worker that does nothing: the benchmarks measure the framework, not a handler."""

from __future__ import annotations

from typing import Any

from workers import Task, Worker


def noop_job(n: int, payload: str) -> dict[str, Any]:
    """A job of ``n`` independent no-op tasks, each with ``payload`` as its input and a spec that expects it back."""
    return {"goal": "bench", "budget": {"max_tasks": max(n, 1)}, "tasks": [
        {"id": f"t{i}", "capability": "noop", "input": payload, "spec": {"expect": payload}} for i in range(n)]}


class NoopWorker(Worker):
    """Returns its input unchanged."""

    capability = "noop"

    async def handle(self, task: Task) -> Any:
        return task.input


def serve_on_redis(url: str, ns: str, settings: Any, ready: Any, *, name: str) -> None:
    """The benchmarks' worker process: a ``WorkerRuntime`` serving this worker (concurrency 256) on ``RedisBus``
    with ``settings`` (``BusSettings``); sets ``ready`` (a multiprocessing event) once it serves. Runs until killed."""
    import anyio

    from protocol.logging import configure_logging
    from protocol.redis_bus import RedisBus
    from workers.runtime import RuntimeSettings, WorkerRuntime

    configure_logging("WARNING")

    async def main() -> None:
        async with RedisBus.from_url(url, settings=settings, namespace=ns) as bus:
            runtime = WorkerRuntime(bus, {"noop": NoopWorker()}, RuntimeSettings(concurrency=256, name=name))
            async with anyio.create_task_group() as tg:
                await tg.start(runtime.serve)
                ready.set()

    anyio.run(main)
