"""The operator's web console: runs, a live task tree per run, and a person's decisions.

``orchestrator ui`` serves it for a namespace on Redis, ``orchestrator run JOB --ui`` for an
in-process run. See docs/console.md.
"""

from orchestrator.ui.app import console_app
from orchestrator.ui.auth import Operator, Operators
from orchestrator.ui.fleet import open_fleet_console
from orchestrator.ui.server import ConsoleAddress, serve_console
from orchestrator.ui.source import RunSource, redis_run_ids
from orchestrator.ui.view import RunPage

__all__ = ("ConsoleAddress", "Operator", "Operators", "RunPage", "RunSource", "console_app", "open_fleet_console",
           "redis_run_ids", "serve_console")
