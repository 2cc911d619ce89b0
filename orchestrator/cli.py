"""The ``orchestrator`` command line.

Exit codes: 0 the run was accepted, 1 it failed or was cancelled, 2 an invalid job or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import anyio
from rich.console import Console
from rich.live import Live

from orchestrator.api import Orchestrator, RunResult
from orchestrator.display import RunView, render_summary, render_table
from protocol.errors import ConfigError, OrchestratorError, PluginLoadError
from protocol.logging import configure_logging
from workers import registry

__all__ = ("main",)

EXIT_ACCEPTED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb."""
    parser = _Parser(prog="orchestrator", description="Run task trees with verified results.")
    parser.add_argument("--log-level", default="WARNING", help="log level for stderr (default: WARNING)")
    parser.add_argument("--log-json", action="store_true", default=None, help="log JSON lines even on a terminal")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    run = verbs.add_parser("run", help="run a job file to the end, in process")
    run.add_argument("job", help="path to a job file (YAML)")
    run.add_argument("--json", action="store_true", help="print one JSON object with run_id, state and tasks")
    run.add_argument("--worker", action="append", default=None, metavar="PLUGIN",
                     help="serve only these workers (entry point name or module:Class); repeatable")
    run.add_argument("--concurrency", type=int, default=8, help="tasks run at once per process (default: 8)")
    run.set_defaults(func=_cmd_run)

    plugins = verbs.add_parser("plugins", help="list installed worker plugins")
    plugins.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    try:
        code: int = args.func(args)
    except (ConfigError, PluginLoadError) as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own error channel
        return EXIT_USAGE
    except OrchestratorError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)  # noqa: T201 - as above
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {args.concurrency}")
    console = Console(stderr=args.json)
    result = anyio.run(_run, args, console)
    if args.json:
        print(json.dumps(result.to_dict(), default=str))  # noqa: T201 - the --json contract is stdout
    return EXIT_ACCEPTED if result.accepted else EXIT_FAILED


async def _run(args: argparse.Namespace, console: Console) -> RunResult:
    async with Orchestrator(workers=args.worker, concurrency=args.concurrency) as orch:
        run = await orch.submit(args.job)
        view = RunView()
        wide = console.width >= 120
        live_display = console.is_terminal and not args.json
        with Live(render_table(view, wide=wide), console=console, refresh_per_second=8, transient=True,
                  auto_refresh=live_display) as live:
            async for event in run.events():
                view.apply(event)
                if live_display:
                    live.update(render_table(view, wide=wide))
        result = await run.wait()
    if not args.json:
        console.print(render_summary(view, result.to_dict(), wide=console.width >= 120))
    return result


def _cmd_plugins(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name, ep in sorted(registry.available().items()):
        rows.append({"capability": name, "target": ep.value, "package": ep.dist.name if ep.dist else ""})
    for row in rows:
        print(f"{row['capability']:<20} {row['target']:<50} {row['package']}")  # noqa: T201 - CLI output
    return EXIT_ACCEPTED


if __name__ == "__main__":
    sys.exit(main())
