"""Worker plugins: the ``Worker`` base class, its runtime and the plugin registry."""

from workers.base import NoConfig, Task, Verdict, Worker, WorkerContext

__all__ = ("NoConfig", "Task", "Verdict", "Worker", "WorkerContext")
