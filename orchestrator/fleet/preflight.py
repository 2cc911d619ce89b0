"""Check that every process of a fleet can start, before ``fleet up`` starts any of them.

A process whose executable is not on ``PATH`` would otherwise be restarted with backoff until it
is given up ("exited with 127"), after the processes before it had started. Here each one is
resolved first: its executable on the ``PATH`` it will run with, and, for the processes that run
this installation's own CLI (manager, workers, console), its command line against the CLI's parser,
so a verb this installation lacks is named too, and the console's optional dependencies
(``orchestrator[ui]``) must import. Worker plugins are
resolved through the entry point registry by :func:`~orchestrator.fleet.manifest.check_plugins`.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Sequence

from orchestrator.fleet.commands import ProcessSpec
from orchestrator.fleet.manifest import VLLM_BINARY_ENV, FleetManifest
from protocol.errors import ManifestError

__all__ = ("check_processes",)

_CLI = ("-m", "orchestrator.cli")


def _field(manifest: FleetManifest, spec: ProcessSpec) -> str:
    if spec.role == "llm":
        return "spec.llm.serve.command"
    if spec.role == "ui":
        return "spec.ui"
    if spec.role == "worker":
        index = next(i for i, w in enumerate(manifest.spec.workers) if w.capability == spec.capability)
        return f"spec.workers[{index}]"
    return "spec.manager"


def _resolve(executable: str, path: str | None) -> str | None:
    if os.sep in executable:
        return executable if os.access(executable, os.X_OK) and os.path.isfile(executable) else None
    return shutil.which(executable, path=path)


def _cli_problem(argv: Sequence[str]) -> str | None:
    """Why this installation's CLI would refuse ``argv`` (the arguments after ``-m orchestrator.cli``), or None."""
    from orchestrator.cli import _UsageError, build_parser  # the CLI imports the fleet: import it late

    verb = list(argv[2:3] if argv[:1] == ["--log-level"] else argv[:1])
    if verb == ["sim-llm"]:
        return None  # the simulator parses its own `vllm serve` flags, outside the CLI's parser
    try:
        build_parser().parse_args(list(argv))
    except _UsageError as exc:
        return str(exc)
    return None


def _console_problem() -> str | None:
    """Why ``orchestrator ui`` would fail on import here (its optional dependencies), or None."""
    try:
        importlib.import_module("orchestrator.ui")
    except ImportError as exc:
        return (f"the web console needs starlette and uvicorn ({exc.name or exc} is missing): "
                "pip install 'orchestrator[ui]', or remove spec.ui")
    return None


def check_processes(manifest: FleetManifest, specs: Sequence[ProcessSpec], *, source: str = "<manifest>") -> None:
    """Raise :class:`ManifestError` naming the first process that cannot start, and what it lacks."""
    for spec in specs:
        field = _field(manifest, spec)
        executable = spec.argv[0]
        if _resolve(executable, spec.env.get("PATH", os.environ.get("PATH"))) is None:
            hint = ""
            if spec.role == "llm":
                hint = (f" (install vLLM on a GPU machine: pip install 'orchestrator[vllm]'; or serve the "
                        f"built-in simulator with command: [orchestrator, sim-llm]; or point at a running "
                        f"server with ORCH_LLM_URL; {VLLM_BINARY_ENV} overrides the command)")
            raise ManifestError(f"process {spec.name!r} cannot start: executable {executable!r} is not found on "
                                f"PATH{hint}; nothing was started", source=source, field=field)
        if executable == sys.executable and tuple(spec.argv[1:3]) == _CLI:
            problem = _cli_problem(spec.argv[3:])
            if problem is not None:
                raise ManifestError(f"process {spec.name!r} cannot start: this installation's orchestrator CLI "
                                    f"refuses its command line ({problem}); nothing was started",
                                    source=source, field=field)
            if spec.role == "ui" and (problem := _console_problem()) is not None:
                raise ManifestError(f"process {spec.name!r} cannot start: {problem}; nothing was started",
                                    source=source, field=field)
