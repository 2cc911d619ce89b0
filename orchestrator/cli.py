"""The ``orchestrator`` command line.

Exit codes: 0 the run was accepted, 1 it failed or was cancelled (or a service it needs failed),
2 an invalid job, setting or usage, or an unknown run, 3 the run has not ended yet (``status`` of
a queued or running run), 141 stdout was closed early (``| head``). With ``--json`` a command
that cannot do its work prints ``{"error": ..., "error_type": ...}`` on stdout, with the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from orchestrator import processes
from orchestrator._checks import CheckRegistry, default_checks
from orchestrator.acknowledger import MIRRORS
from orchestrator.api import Orchestrator, RunResult
from orchestrator.display import RunView, event_line, render_summary, render_table
from orchestrator.following import HISTORY_WAIT_S
from orchestrator.gctune import WORKER_THRESHOLDS, tune_gc
from orchestrator.job import Job, load_job
from orchestrator.keys_cli import add_keys_flags, add_keys_parser, add_operator_flag, trust_of
from orchestrator.ledger import read_history
from orchestrator.manager import DEFAULT_DISPATCH_WINDOW
from orchestrator.planner import Planner
from orchestrator.simulator import SimConfig, SimulatedVLLM
from orchestrator.trust import Trust, pick_operator
from protocol.bus import Bus
from protocol.errors import BusUnavailable, ConfigError, OrchestratorError, PluginLoadError
from protocol.inference import InferenceClient
from protocol.inference_settings import InferenceSettings
from protocol.logging import configure_logging
from protocol.settings import RedisSettings, count, env_value, port, redact_url, seconds, setting_error
from workers import registry

__all__ = ("main",)

_E = TypeVar("_E", bound=BaseException)

EXIT_ACCEPTED, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_ENDED = 0, 1, 2, 3
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE: what cat, grep and git report when the reader goes away

_EXIT_FOR_STATE = {"accepted": EXIT_ACCEPTED, "failed": EXIT_FAILED, "cancelled": EXIT_FAILED}


def _exit_for(state: str) -> int:
    """0 accepted, 1 failed or cancelled, 3 not ended yet (queued or running)."""
    return _EXIT_FOR_STATE.get(state, EXIT_NOT_ENDED)


class _UsageError(Exception):
    """A command line argparse rejects; ``main`` reports it (and as JSON under ``--json``)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


@dataclass(frozen=True, slots=True)
class _FromEnv:
    """An option's default taken from an ``ORCH_*`` variable after parsing, and only for the verb given.

    So a bad ``ORCH_LEASE_S`` fails the verbs that use it (exit 2, naming it), not ``plugins``.
    """

    var: str
    parse: Callable[[str], Any]
    default: Any

    def resolve(self) -> Any:
        return env_value(self.var, self.parse, self.default)


def _mirror(text: str) -> str:
    """A manager's ``--mirror``: one of ``MIRRORS``."""
    if text not in MIRRORS:
        raise ValueError(f"expected one of {', '.join(MIRRORS)}")
    return text


def _resolve_env(args: argparse.Namespace) -> None:
    """Replace each option left at its ``ORCH_*`` default with the variable's parsed value."""
    sources: dict[str, str] = {}
    for dest, value in vars(args).items():
        if isinstance(value, _FromEnv):
            setattr(args, dest, value.resolve())
            if os.environ.get(value.var, "").strip():
                sources[dest] = value.var
    args.env_sources = sources


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb."""
    parser = _Parser(prog="orchestrator", description="Run task trees with verified results.")
    parser.add_argument("--log-level", default="WARNING", help="log level for stderr (default: WARNING)")
    parser.add_argument("--log-json", action="store_true", default=None, help="log JSON lines even on a terminal")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    run = verbs.add_parser("run", help="run a job file, or plan and run a goal, to the end, in process")
    run.add_argument("job", metavar="JOB_OR_GOAL",
                     help="a job file (YAML), or a goal in words for the LLM planner")
    run.add_argument("--json", action="store_true", help="print one JSON object with run_id, state and tasks")
    run.add_argument("--worker", action="append", default=None, metavar="PLUGIN",
                     help="serve only these workers (entry point name or module:Class); repeatable")
    run.add_argument("--concurrency", type=int, default=8, help="tasks run at once per process (default: 8)")
    _allow_check_flag(run)
    _llm_flags(run, fallback="; without one, work that needs a model runs on the built-in vLLM simulator")
    run.add_argument("--ui", action="store_true",
                     help="serve the web console for this run while it runs (prints a login URL)")
    run.add_argument("--ui-port", type=int, default=8080, metavar="PORT",
                     help="the console's port with --ui (default 8080; 0 picks a free one)")
    run.add_argument("--ui-host", default="127.0.0.1", metavar="HOST",
                     help="the address the console binds with --ui (default 127.0.0.1)")
    run.set_defaults(func=_cmd_run)

    plugins = verbs.add_parser("plugins", help="list installed worker plugins")
    plugins.add_argument("--json", action="store_true",
                         help="print a JSON array, one object per plugin: name, capability, target, package, "
                              "version, description, needs_llm, error")
    plugins.set_defaults(func=_cmd_plugins)

    verbs.add_parser("sim-llm", add_help=False,
                     help="serve the vLLM simulator over HTTP (flags follow `vllm serve`; see sim-llm --help)")

    manager = verbs.add_parser("manager", help="run the manager process against Redis (one leads, others stand by)")
    _redis_flags(manager)
    manager.add_argument("--ledger", default=_FromEnv("ORCH_LEDGER", str, "orchestrator-ledger.db"),
                         help="SQLite ledger path (env ORCH_LEDGER; default ./orchestrator-ledger.db)")
    manager.add_argument("--name", default=None, help="manager name in logs and leases (default: manager-HOST-PID)")
    manager.add_argument("--max-queue", type=int, default=_FromEnv("ORCH_MAX_QUEUE", count, None), metavar="N",
                         help="back-pressure: dispatch waits while a capability has N tasks waiting or in flight "
                              "(env ORCH_MAX_QUEUE; default: unbounded)")
    manager.add_argument("--dispatch-window", type=int,
                         default=_FromEnv("ORCH_DISPATCH_WINDOW", count, DEFAULT_DISPATCH_WINDOW), metavar="N",
                         help="the most tasks of one run in flight at once; more ready tasks are held until these end "
                              f"(env ORCH_DISPATCH_WINDOW; default: {DEFAULT_DISPATCH_WINDOW})"),
    manager.add_argument("--mirror", choices=MIRRORS, default=_FromEnv("ORCH_MIRROR", _mirror, "followed"),
                         help="whose history goes to the bus for events, watch and the console: the runs someone "
                              "follows (they ask; default), every run, or none (env ORCH_MIRROR)")
    manager.add_argument("--manager-lease-s", type=float, default=5.0,
                         help="leadership lease; a standby takes over this long after the leader dies")
    _allow_check_flag(manager)
    _exit_after_flag(manager)
    _llm_flags(manager)
    _observability_flags(manager)
    manager.set_defaults(func=_cmd_manager)

    worker = verbs.add_parser("worker", help="run a worker process for one capability against Redis")
    _redis_flags(worker)
    worker.add_argument("--capability", required=True, help="the capability to serve")
    worker.add_argument("--plugin", default=None,
                        help="entry point name or module:Class (default: the capability's entry point)")
    worker.add_argument("--concurrency", type=int, default=8, help="tasks handled at once (default: 8)")
    worker.add_argument("--name", default=None, help="consumer name (default: worker-HOST-PID)")
    worker.add_argument("--config", default="{}", help="the plugin's config as a JSON object")
    worker.add_argument("--drain-s", type=float, default=10.0,
                        help="on SIGTERM, how long in-flight tasks may finish before they are handed back")
    _exit_after_flag(worker, "--retry-budget-s")  # the flag's old name
    _llm_flags(worker)
    _observability_flags(worker)
    worker.set_defaults(func=_cmd_worker)

    submit = verbs.add_parser("submit", help="submit a job file, or plan and submit a goal, to the running manager; "
                                             "prints the run id")
    _redis_flags(submit)
    submit.add_argument("job", metavar="JOB_OR_GOAL",
                        help="a job file (YAML), or a goal in words for the LLM planner (tasks for capability llm)")
    submit.add_argument("--json", action="store_true", help="print JSON ({'run_id'}, or the final run with --wait)")
    submit.add_argument("--wait", action="store_true", help="block until the run ends; exit 0 accepted, 1 not")
    _llm_flags(submit, fallback="; the planner's server for a goal (without one: the built-in vLLM simulator)")
    add_operator_flag(submit)
    _allow_check_flag(submit)
    submit.set_defaults(func=_cmd_submit)

    status = verbs.add_parser("status", help="show a run's tasks, states, attempts and outputs")
    _redis_flags(status)
    status.add_argument("run_id")
    status.add_argument("--json", action="store_true", help="print the run as one JSON object")
    status.set_defaults(func=_cmd_status)
    events = verbs.add_parser("events", help="print a run's full history: every transition, verdict and override")
    _redis_flags(events)
    events.add_argument("run_id")
    events.add_argument("--json", action="store_true", help="print one JSON object per line")
    events.add_argument("--ledger", metavar="PATH", default=None,
                        help="read the history from this manager's ledger file instead of the bus (no Redis "
                             "needed; read-only, so a running manager's ledger is fine)")
    events.add_argument("--wait-s", type=float, default=HISTORY_WAIT_S, metavar="S",
                        help="how long to wait for the manager to send what the bus lacks of the history "
                             f"(default {HISTORY_WAIT_S:g}); then exit 1")
    events.set_defaults(func=_cmd_events)

    watch = verbs.add_parser("watch", help="follow a run live as a tree of its tasks, then summarize it")
    _redis_flags(watch)
    watch.add_argument("run_id")
    watch.set_defaults(func=_cmd_watch)

    ui = verbs.add_parser("ui", help="serve the web console: runs, live task trees, and decisions by operators")
    _redis_flags(ui)
    ui.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080; 0 picks a free one)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1; anyone who reaches it can read every run)")
    ui.add_argument("--operator", action="append", default=None, metavar="NAME",
                    help="offer a login only to this operator (repeatable; default: every operator key in the "
                         "keyring; with --insecure, only those named, and none makes the console read-only)")
    ui.set_defaults(func=_cmd_ui)

    for verb, text in (("approve", "accept a task that waits for a person (spec approval: human)"),
                       ("reject", "send a task's result back with feedback (a redo the worker sees)"),
                       ("redo", "force another attempt at a task, with feedback"),
                       ("accept", "accept a task's result as it stands"),
                       ("cancel", "cancel a task, or the whole run when no task is given")):
        override = verbs.add_parser(verb, help=text)
        _redis_flags(override)
        override.add_argument("run_id")
        override.add_argument("task_id", nargs="?" if verb == "cancel" else None, default="",
                              help="the job's task id")
        override.add_argument("--feedback", required=verb == "reject", default="",
                              help="what to change (the worker sees it in task.feedback)" if verb != "cancel"
                              else "why (recorded as the reason)")
        override.add_argument("--by", default=_default_person(),
                              help="a display name for unsigned buses (default: USER@HOST); with keys the "
                                   "history records the operator key's identity")
        add_operator_flag(override)
        override.set_defaults(func=_cmd_override, action=verb)

    from orchestrator.fleet.cli import add_fleet_parser  # fleet up | status | render

    add_fleet_parser(verbs)
    add_keys_parser(verbs)
    return parser


def _allow_check_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-check", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="let jobs name this check function besides those installed under the entry point "
                             "group orchestrator.checks (also ORCH_ALLOW_CHECKS, comma-separated); repeatable")


def _exit_after_flag(parser: argparse.ArgumentParser, *aliases: str) -> None:
    parser.add_argument("--exit-after-s", *aliases, type=float, default=_FromEnv("ORCH_EXIT_AFTER_S", seconds, None),
                        metavar="N", dest="exit_after_s",
                        help="exit 1 once Redis has been unreachable for N seconds (env ORCH_EXIT_AFTER_S; default: "
                             "wait for Redis however long it takes)")


def _default_person() -> str:
    return f"{os.environ.get('USER') or os.environ.get('USERNAME') or 'someone'}@{socket.gethostname()}"


def _llm_flags(parser: argparse.ArgumentParser, *, fallback: str = "") -> None:
    parser.add_argument("--llm-url", default=None, metavar="URL",
                        help=f"OpenAI-compatible server, e.g. http://host:8000/v1 (env ORCH_LLM_URL){fallback}")
    parser.add_argument("--model", default=None, help="served model name (env ORCH_LLM_MODEL; default: the first)")
    parser.add_argument("--api-key", default=None, help="the server's API key (env ORCH_LLM_API_KEY)")


_LLM_FLAGS = {"url": "--llm-url", "model": "--model", "api_key": "--api-key"}


def _llm_settings(args: argparse.Namespace) -> InferenceSettings | None:
    """The LLM server from flags or environment, or None when none is configured."""
    overrides = {k: v for k, v in (("url", args.llm_url), ("model", args.model), ("api_key", args.api_key)) if v}
    if not overrides.get("url") and not os.environ.get("ORCH_LLM_URL"):
        return None
    try:
        return InferenceSettings.from_env(**overrides)
    except ValidationError as exc:
        raise setting_error(exc, _llm_sources(overrides)) from exc


def _llm_sources(overrides: dict[str, Any]) -> dict[str, str]:
    """What set each ``InferenceSettings`` field: a flag, or ``ORCH_LLM_<FIELD>`` (the key's value never shown)."""
    sources: dict[str, str] = {}
    for field in InferenceSettings.model_fields:
        var = f"ORCH_LLM_{field.upper()}"
        if field in overrides:
            sources[field] = _LLM_FLAGS[field]
        elif field == "api_key":
            sources[field] = var
        else:
            sources[field] = f"{var}={os.environ.get(var, '')!r}"
    return sources


def _observability_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=_FromEnv("ORCH_METRICS_PORT", port, None), metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (env ORCH_METRICS_PORT; "
                             "default: no endpoint)")
    parser.add_argument("--metrics-host", default=_FromEnv("ORCH_METRICS_HOST", str, "0.0.0.0"),
                        help="address the metrics endpoint binds (env ORCH_METRICS_HOST; default 0.0.0.0)")
    parser.add_argument("--trace", action="store_true",
                        help="send OpenTelemetry traces to the exporter OTEL_TRACES_EXPORTER names (default otlp, "
                             "to OTEL_EXPORTER_OTLP_ENDPOINT); needs orchestrator[tracing]")


def _observability(args: argparse.Namespace) -> processes.Observability:
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port must be a port number, got {args.metrics_port}")
    return processes.Observability(metrics_port=args.metrics_port, metrics_host=args.metrics_host, tracing=args.trace)


def _redis_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", default=_FromEnv("ORCH_REDIS_URL", str, processes.DEFAULT_REDIS_URL),
                        metavar="URL",
                        help="Redis URL, redis:// or rediss://, password in the URL (env ORCH_REDIS_URL)")
    parser.add_argument("--namespace", default=_FromEnv("ORCH_NAMESPACE", str, "orch"),
                        help="key prefix shared by a fleet (env ORCH_NAMESPACE; default orch)")
    parser.add_argument("--lease-s", type=float, default=_FromEnv("ORCH_LEASE_S", seconds, 30.0),
                        help="task lease: a dead worker's task is picked up this long after it died "
                             "(env ORCH_LEASE_S; default 30)")
    add_keys_flags(parser)


def _check_redis(args: argparse.Namespace) -> None:
    """Reject a bad Redis URL or namespace before connecting, naming the flag or variable that set it."""
    if not hasattr(args, "redis"):
        return
    try:
        RedisSettings(url=args.redis, namespace=args.namespace)
    except ValidationError as exc:
        env = args.env_sources
        raise setting_error(exc, {
            "url": f"ORCH_REDIS_URL={redact_url(args.redis)!r}" if "redis" in env else "--redis",
            "namespace": f"ORCH_NAMESPACE={args.namespace!r}" if "namespace" in env else "--namespace",
        }) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim-llm"]:
        from orchestrator.simulator.cli import serve  # its own flags, mirroring `vllm serve`

        return serve(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own error channel
        if "--json" in argv:
            _print_error_json(exc, "UsageError")
        return EXIT_USAGE
    as_json = bool(getattr(args, "json", False))
    try:
        _resolve_env(args)
        _check_redis(args)
        configure_logging(args.log_level, json=args.log_json)
        code: int = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is caught below and not at interpreter exit
        if _stdout_gone.is_set():
            return EXIT_STDOUT_CLOSED
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        if _find(exc, BrokenPipeError) is not None:
            return _stdout_closed()
        # Task groups wrap failures in exception groups; the user needs the one error that explains them.
        error = _find(exc, OrchestratorError)
        if error is None:
            if as_json and isinstance(exc, Exception):
                _print_error_json(exc)  # a script still gets its object; the traceback below is for a bug report
            raise
        print(f"orchestrator: error: {error}", file=sys.stderr)  # noqa: T201 - the CLI's own error channel
        if as_json:
            _print_error_json(error)
        return EXIT_USAGE if isinstance(error, ConfigError | PluginLoadError) else EXIT_FAILED
    return code


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    """``exc`` if it is a ``kind``, else the first ``kind`` inside it when it is an exception group."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _find(inner, kind)) is not None:
                return found
    return None


def _print_error_json(error: BaseException, error_type: str | None = None) -> None:
    """The ``--json`` contract when a command cannot do its work: one object with ``error``, on stdout."""
    try:
        data = {"error": str(error), "error_type": error_type or type(error).__name__}
        print(json.dumps(data), flush=True)  # noqa: T201 - the --json contract is stdout
    except BrokenPipeError:
        _stdout_closed()


_stdout_gone = threading.Event()


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head -1``): stop quietly, as ``cat`` does, with 141 (128 + SIGPIPE).

    Further writes, and the flush at exit, go to /dev/null instead of raising again.
    """
    if not _stdout_gone.is_set():
        _stdout_gone.set()
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    return EXIT_STDOUT_CLOSED


class _Console(Console):
    """A rich console whose closed stdout ends the command like any closed pipe, not with rich's exit 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        if self.stderr:
            return  # nowhere left to say anything
        _stdout_closed()
        if threading.current_thread() is threading.main_thread():
            raise BrokenPipeError  # main() returns 141; a refresh thread just stops drawing


def _cmd_run(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.ui:
        _check_port("--ui-port", args.ui_port)
        _console_module()
    console = _Console(stderr=args.json)
    result = anyio.run(_run, args, console)
    if args.json:
        print(json.dumps(result.to_dict(), default=str))  # noqa: T201 - the --json contract is stdout
    return _exit_for(result.state)


def _is_job_file(arg: str) -> bool:
    return Path(arg).exists() or arg.endswith((".yaml", ".yml", ".json")) or ("\n" not in arg and os.sep in arg
                                                                           and " " not in arg)


def _needs_llm(job_path: str, checks: CheckRegistry) -> bool:
    llm_capabilities = {name for name, ep in registry.available().items() if _plugin_needs_llm(ep.value)}
    return any(t.capability in llm_capabilities for t in load_job(job_path, checks=checks).tasks)


def _plugin_needs_llm(target: str) -> bool:
    try:
        return registry.load_reference(target).needs_inference
    except PluginLoadError:
        return False  # reported properly when the job is loaded


async def _run(args: argparse.Namespace, console: Console) -> RunResult:
    goal = None if _is_job_file(args.job) else args.job
    simulated = False
    async with AsyncExitStack() as stack:
        settings = _llm_settings(args)
        if settings is None and (goal is not None or _needs_llm(args.job, default_checks(args.allow_check))):
            sim = await stack.enter_async_context(SimulatedVLLM(SimConfig(time_scale=0.05)))
            settings = InferenceSettings(url=sim.url, model=sim.model)
            simulated = True
            console.print("[yellow]No LLM server configured (--llm-url or ORCH_LLM_URL): using the built-in vLLM "
                          "simulator. Its answers are simulated.[/yellow]", highlight=False, soft_wrap=True)
        orch = await stack.enter_async_context(Orchestrator(workers=args.worker, concurrency=args.concurrency,
                                                            llm=settings, allow_checks=args.allow_check))
        console_url = await _serve_run_console(stack, orch, args) if args.ui else None
        job = await orch.plan(goal) if goal is not None else args.job
        run = await orch.submit(job)
        if console_url is not None:
            _Console(stderr=True).print(f"orchestrator: this run in the console: {console_url}/#/run/{run.run_id}",
                                        markup=False, highlight=False, soft_wrap=True)
        view = RunView()
        live_display = console.is_terminal and not args.json
        with Live(render_table(view, width=console.width), console=console, refresh_per_second=8, transient=True,
                  auto_refresh=live_display) as live:
            async for event in run.events():
                view.apply(event)
                if live_display:
                    live.update(render_table(view, width=console.width))
        result = await run.wait()
    if not args.json:
        console.print(render_summary(view, result.to_dict(), width=console.width))
    if simulated:
        console.print("[yellow]note: every model answer in this run came from the vLLM simulator.[/yellow]",
                      highlight=False, soft_wrap=True)
    return result


def _console_module() -> Any:
    """``orchestrator.ui``, or a ConfigError saying how to install what it needs."""
    try:
        import orchestrator.ui as console
    except ImportError as exc:
        raise ConfigError(f"the web console needs starlette and uvicorn ({exc.name} is missing): "
                          "pip install 'orchestrator[ui]'") from exc
    return console


def _check_port(flag: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{flag} must be a port number (0-65535), got {value}")


def _announce_console(url: Any, operators: Any) -> None:
    """Say where the console is and how each operator logs in (stderr: the tokens are secrets for its reader)."""
    err = _Console(stderr=True)
    ops = operators.all()
    note = "" if ops else " (read-only: no operator)"
    err.print(f"orchestrator: console at {url}{note}", markup=False, highlight=False, soft_wrap=True)
    for op in ops:
        err.print(f"orchestrator: log in as {op.identity}: {url.login_url(op.token)}", markup=False, highlight=False,
                  soft_wrap=True)


async def _serve_run_console(stack: AsyncExitStack, orch: Orchestrator, args: argparse.Namespace) -> str:
    """Serve the console for this process's runs until the run ends; the person running it is its operator."""
    console = _console_module()
    operators = console.Operators.named([_default_person()])
    source = console.RunSource(orch.bus, orch.store.run_ids)
    tg = await stack.enter_async_context(anyio.create_task_group())
    stack.callback(tg.cancel_scope.cancel)
    url = await tg.start(functools.partial(console.serve_console, source, operators, host=args.ui_host,
                                           port=args.ui_port))
    _announce_console(url, operators)
    return str(url)


def _cmd_ui(args: argparse.Namespace) -> int:
    _check_port("--port", args.port)
    console = _console_module()
    from orchestrator.ui.fleet import open_fleet_console

    async def go() -> None:
        async with AsyncExitStack() as stack:
            source, operators = await open_fleet_console(
                stack, url=processes.redis_url(args.redis), namespace=args.namespace, lease_s=args.lease_s,
                keys=args.keys, insecure=args.insecure, operators=args.operator or [])
            async with anyio.create_task_group() as tg:

                async def ready(url: Any) -> None:
                    _announce_console(url, operators)

                tg.start_soon(functools.partial(console.serve_console, source, operators, host=args.host,
                                                port=args.port, ready=ready))
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        return

    anyio.run(go)
    return EXIT_ACCEPTED


def _cmd_manager(args: argparse.Namespace) -> int:
    if args.max_queue is not None and args.max_queue < 1:
        raise ConfigError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.dispatch_window < 1:
        raise ConfigError(f"--dispatch-window must be at least 1, got {args.dispatch_window}")
    tune_gc()  # this process is a manager: large long-lived heaps
    anyio.run(functools.partial(
        processes.run_manager, url=processes.redis_url(args.redis), ledger=Path(args.ledger),
        name=args.name or processes.default_name("manager"), namespace=args.namespace, lease_s=args.lease_s,
        manager_lease_s=args.manager_lease_s, llm=_llm_settings(args), observability=_observability(args),
        max_queue=args.max_queue, dispatch_window=args.dispatch_window, mirror=args.mirror,
        exit_after_s=args.exit_after_s, allow_checks=args.allow_check,
        trust=trust_of(args, ["manager"], what="the manager")))
    return EXIT_ACCEPTED


def _cmd_worker(args: argparse.Namespace) -> int:
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError("--config must be a JSON object")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {args.concurrency}")
    anyio.run(functools.partial(
        processes.run_worker, url=processes.redis_url(args.redis), capability=args.capability,
        plugin=args.plugin or args.capability, concurrency=args.concurrency,
        name=args.name or processes.default_name("worker"), namespace=args.namespace, lease_s=args.lease_s,
        config=config, drain_s=args.drain_s, exit_after_s=args.exit_after_s, llm=_llm_settings(args),
        observability=_observability(args), gc_thresholds=WORKER_THRESHOLDS,  # this process is a worker
        trust=trust_of(args, [f"worker:{args.capability}"], what=f"a worker for {args.capability!r}")))
    return EXIT_ACCEPTED


# How long ``submit --wait`` waits for a manager before saying there is none, counted from the start
# of the command: time for one started alongside to take the lease, and still said within 10 s.
MANAGER_DEADLINE_S = 7.0
# While waiting on a run: longer than a standby takes to take over (it polls the lease every third
# of its 5 s lease).
MANAGER_GRACE_S = 5.0
_IMPORTED = time.monotonic()


def _process_age_s() -> float:
    """Seconds since this process started (from /proc on Linux, so imports count), else since this module loaded."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
            age = float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 3600:
            return age
    except (OSError, ValueError, IndexError):
        pass
    return time.monotonic() - _IMPORTED


async def _plan_goal(goal: str, args: argparse.Namespace) -> Job:
    """Plan ``goal`` into a job here, as ``run`` does: on the LLM given, else on the built-in simulator.

    The plan's tasks use capability ``llm``, which the fleet's LLM workers serve.
    """
    async with AsyncExitStack() as stack:
        settings = _llm_settings(args)
        if settings is None:
            sim = await stack.enter_async_context(SimulatedVLLM(SimConfig(time_scale=0.05)))
            settings = InferenceSettings(url=sim.url, model=sim.model)
            print("orchestrator: note: no LLM server configured (--llm-url or ORCH_LLM_URL): the goal is planned "  # noqa: T201
                  "by the built-in vLLM simulator; its plan is simulated", file=sys.stderr)
        client = await stack.enter_async_context(InferenceClient(settings))
        return await Planner(client, capabilities=["llm"]).plan(goal)


def _cmd_submit(args: argparse.Namespace) -> int:
    # A file: capabilities are the fleet's business, everything else is checked here. Words: a goal to plan,
    # once the operator's key is known to be there (no plan is made for a submission that cannot be signed).
    job = load_job(args.job, checks=default_checks(args.allow_check)) if _is_job_file(args.job) else None
    trust = _client_trust(args)
    if job is None:
        job = anyio.run(_plan_goal, args.job, args)
    url = processes.redis_url(args.redis)

    async def go() -> int:
        async with _client_bus(args, trust) as bus:
            if args.wait:  # nothing would ever end the wait: say so, and submit nothing
                try:
                    left = max(1.0, MANAGER_DEADLINE_S - _process_age_s())
                    await processes.wait_for_manager(url, namespace=args.namespace, within_s=left)
                except processes.NoActiveManager as exc:
                    raise processes.NoActiveManager(f"{exc}; the job was not submitted") from None
            run_id = await processes.submit_job(bus, job, source=args.job if _is_job_file(args.job) else "goal")
            await _warn_unserved(bus, job, run_id)
            if not args.wait:
                if await processes.active_manager(url, namespace=args.namespace) is None:
                    note = f"orchestrator: warning: no active manager; run {run_id} is queued until one starts"
                    print(note, file=sys.stderr)  # noqa: T201 - the CLI's own error channel
                print(json.dumps({"run_id": run_id}) if args.json else run_id)  # noqa: T201 - CLI output
                return EXIT_ACCEPTED
            async with anyio.create_task_group() as tg:
                tg.start_soon(_manager_stays, url, args.namespace, run_id)
                result = await processes.wait_for_run(bus, run_id)
                tg.cancel_scope.cancel()
        _print_run(result, as_json=args.json)
        return _exit_for(result["state"])

    return anyio.run(go)


async def _warn_unserved(bus: Bus, job: Job, run_id: str) -> None:
    """Say at once when the job names a capability no live worker serves (a typo, or none started yet)."""
    served = await bus.served(sorted({t.capability for t in job.tasks}))
    for capability, workers in sorted(served.items()):
        if workers == 0:
            tasks = ", ".join(t.id for t in job.tasks if t.capability == capability)
            print(f"orchestrator: warning: no live worker serves capability {capability!r} (tasks {tasks}); "  # noqa: T201
                  f"run {run_id}'s tasks wait for one, and fail after budget.no_worker_s="
                  f"{job.budget.no_worker_s:g} s without one", file=sys.stderr)


async def _manager_stays(url: str, namespace: str, run_id: str) -> None:
    """Raise NoActiveManager when no manager holds the lease for ``MANAGER_GRACE_S`` while ``run_id`` runs."""
    while True:
        await anyio.sleep(1.0)
        if await processes.active_manager(url, namespace=namespace) is None:
            try:
                await processes.wait_for_manager(url, namespace=namespace, within_s=MANAGER_GRACE_S)
            except processes.NoActiveManager as exc:
                raise processes.NoActiveManager(f"{exc}; run {run_id} goes on when a manager starts "
                                                f"(follow it with `orchestrator watch {run_id}`)") from None


async def _say_when_no_manager(url: str, namespace: str, run_id: str, *, poll_s: float = 1.0) -> None:
    """While ``watch`` follows a run, say on stderr when no manager has held the lease for ``MANAGER_GRACE_S``
    (nothing records the run's events then: without this the view would just stop), and when one holds it again."""
    say = _Console(stderr=True).print
    missing_since: float | None = None
    said = False
    while True:
        try:
            why = await processes.no_manager_reason(url, namespace=namespace)
        except BusUnavailable:  # the follow itself rides out an outage, or ends the watch saying so
            await anyio.sleep(poll_s)
            continue
        now = anyio.current_time()
        if why:
            missing_since = now if missing_since is None else missing_since
            if not said and now - missing_since >= MANAGER_GRACE_S:
                said = True
                say(f"orchestrator: waiting for {now - missing_since:.0f} s on run {run_id}: {why}", highlight=False,
                    soft_wrap=True)
        else:
            if said:
                say(f"orchestrator: a manager holds the lease again: run {run_id} goes on", highlight=False,
                    soft_wrap=True)
            missing_since, said = None, False
        await anyio.sleep(poll_s)


def _unknown_run(run_id: str) -> processes.UnknownRun:
    return processes.UnknownRun(f"unknown run {run_id!r} (no manager has reported it and no submission of it "
                                "is waiting; a mistyped id, or it expired)")


def _cmd_status(args: argparse.Namespace) -> int:
    async def go() -> dict[str, Any] | None:
        async with _client_bus(args) as bus:
            return await processes.find_run(bus, args.run_id)

    result = anyio.run(go)
    if result is None:
        raise _unknown_run(args.run_id)
    _print_run(result, as_json=args.json)
    return _exit_for(result["state"])


def _cmd_events(args: argparse.Namespace) -> int:
    async def go() -> list[Any]:
        async with _client_bus(args) as bus:
            return await processes.read_events(bus, args.run_id, wait_s=args.wait_s)

    if not args.wait_s >= 0:
        raise ConfigError(f"--wait-s must be 0 or more, got {args.wait_s}")
    if args.ledger is not None:
        return _print_events(_ledger_history(args.ledger, args.run_id), as_json=args.json)
    events = anyio.run(go)
    if not events:
        if anyio.run(_find_run, args) is None:
            raise _unknown_run(args.run_id)
        print(f"run {args.run_id} has no history yet", file=sys.stderr)  # noqa: T201 - a note, not output
    return _print_events(events, as_json=args.json)


def _print_events(events: Sequence[Any], *, as_json: bool) -> int:
    for event in events:
        if as_json:
            print(event.model_dump_json())  # noqa: T201 - CLI output
        else:
            print(event_line(event))  # noqa: T201 - CLI output
    return EXIT_ACCEPTED


def _ledger_history(path: str, run_id: str) -> list[Any]:
    try:
        events = read_history(path, run_id)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"--ledger {path}: cannot read it as a ledger ({exc})") from None
    if events is None:
        raise processes.UnknownRun(f"unknown run {run_id!r} (not in the ledger {path})")
    return events


async def _find_run(args: argparse.Namespace) -> dict[str, Any] | None:
    async with _client_bus(args) as bus:
        return await processes.find_run(bus, args.run_id)


def _cmd_watch(args: argparse.Namespace) -> int:
    console = _Console()

    async def go() -> dict[str, Any]:
        async with _client_bus(args) as bus:
            found = await processes.find_run(bus, args.run_id)
            if found is None:  # at once: following a mistyped id would wait forever in silence
                raise _unknown_run(args.run_id)
            if found["state"] == "queued":
                _Console(stderr=True).print(f"run {args.run_id} is queued: waiting for a manager to take it",
                                           highlight=False, soft_wrap=True)
            view = RunView()
            if found["state"] in _EXIT_FOR_STATE:  # ended: its history is complete, or expired
                for event in await processes.read_events(bus, args.run_id):
                    view.apply(event)
            else:
                with Live(render_table(view, width=console.width), console=console, refresh_per_second=4,
                          transient=True) as live:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_say_when_no_manager, processes.redis_url(args.redis), args.namespace,
                                      args.run_id)
                        async for event in processes.follow_events(bus, args.run_id):
                            view.apply(event)
                            live.update(render_table(view, width=console.width))
                        tg.cancel_scope.cancel()
            if view.state.value in _EXIT_FOR_STATE:  # followed to its end: wait for the summary to agree
                status = await processes.ended_status(bus, args.run_id)
            else:
                status = await processes.fetch_status(bus, args.run_id)
        if status is None:
            raise _unknown_run(args.run_id)
        console.print(render_summary(view, status, width=console.width))
        return status

    status = anyio.run(go)
    return _exit_for(status["state"])


def _cmd_override(args: argparse.Namespace) -> int:
    async def go() -> None:
        async with _client_bus(args) as bus:
            await processes.send_override(bus, args.run_id, args.task_id or "", args.action, feedback=args.feedback,
                                          by=args.by)

    anyio.run(go)
    target = f"task {args.task_id!r} of run {args.run_id}" if args.task_id else f"run {args.run_id}"
    who = args.by if args.insecure else pick_operator(args.keys, args.as_name)
    print(f"{args.action} sent for {target} by {who}")  # noqa: T201 - CLI output
    return EXIT_ACCEPTED


def _client_trust(args: argparse.Namespace) -> Trust:
    """A client verb's keys: signing as the operator where the verb sends (``--as``), else only checking."""
    signers = [pick_operator(args.keys, args.as_name)] if hasattr(args, "as_name") and not args.insecure else []
    return trust_of(args, signers, what=f"'orchestrator {args.verb}'")


def _client_bus(args: argparse.Namespace, trust: Trust | None = None) -> Any:
    """A bus for a client verb (``_client_trust`` unless the caller loaded it already)."""
    trust = trust or _client_trust(args)
    return processes.open_bus(processes.redis_url(args.redis), namespace=args.namespace, lease_s=args.lease_s,
                              retry_budget_s=5.0, trust=trust)


def _print_run(result: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))  # noqa: T201 - the --json contract is stdout
        return
    console = _Console()
    # escaped: rich would take "[accepted]" for a markup tag and print nothing
    title = escape(f"run {result['run_id']}  {result.get('goal', '')}  [{result['state']}]")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("task", "capability", "state", "attempts", "output / reason"):
        table.add_column(column, overflow="fold")
    for t in result["tasks"]:
        last = t["reason"] if t["state"] in ("failed", "cancelled") else json.dumps(t["output"], default=str)
        table.add_row(*(escape(v) for v in (t["id"], t["capability"], t["state"], str(t["attempts"]), last[:200])))
    console.print(table)
    if result.get("reason"):
        console.print(f"reason: {result['reason']}", markup=False)


def plugin_rows() -> list[dict[str, Any]]:
    """Every installed worker plugin, imported to read what it declares (``plugins --json``).

    Keys: ``name`` (entry point), ``capability`` (what the class declares; null if it failed to
    load), ``target`` (``module:Class``), ``package`` and ``version`` (its distribution, or null),
    ``description`` (the first line of the class's docstring, or ""), ``needs_llm``, and ``error``
    (why it failed to load, or null).
    """
    rows: list[dict[str, Any]] = []
    for name, ep in sorted(registry.available().items()):
        row: dict[str, Any] = {"name": name, "capability": None, "target": ep.value,
                               "package": ep.dist.name if ep.dist else None,
                               "version": ep.dist.version if ep.dist else None,
                               "description": "", "needs_llm": None, "error": None}
        try:
            cls = registry.load_entry_point(ep)
        except PluginLoadError as exc:
            row["error"] = str(exc)
        else:
            doc = cls.__dict__.get("__doc__") or ""  # its own docstring, not the Worker base class's
            row.update(capability=cls.capability, description=doc.strip().split("\n")[0],
                       needs_llm=cls.needs_inference)
        rows.append(row)
    return rows


def _cmd_plugins(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(plugin_rows()))  # noqa: T201 - the --json contract is stdout
        return EXIT_ACCEPTED
    for name, ep in sorted(registry.available().items()):
        print(f"{name:<20} {ep.value:<50} {ep.dist.name if ep.dist else ''}")  # noqa: T201 - CLI output
    return EXIT_ACCEPTED


if __name__ == "__main__":
    sys.exit(main())
