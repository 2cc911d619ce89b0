"""Workers that ship with orchestrator: ``python`` runs a snippet in a sandboxed process, ``llm`` asks the model."""

from workers.builtin._sandbox import SandboxError, SandboxLimits, SandboxResult, run_snippet
from workers.builtin.llm import LLMConfig, LLMWorker
from workers.builtin.python import PythonConfig, PythonWorker

__all__ = ("LLMConfig", "LLMWorker", "PythonConfig", "PythonWorker", "SandboxError", "SandboxLimits", "SandboxResult",
           "run_snippet")
