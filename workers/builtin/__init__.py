"""Workers that ship with orchestrator: ``python`` runs a snippet in a sandboxed process."""

from workers.builtin._sandbox import SandboxError, SandboxLimits, SandboxResult, run_snippet
from workers.builtin.python import PythonConfig, PythonWorker

__all__ = ("PythonConfig", "PythonWorker", "SandboxError", "SandboxLimits", "SandboxResult", "run_snippet")
