"""The ``orchestrator`` command line.

Exit codes: 0 the run was accepted, 1 it failed or was cancelled, 2 an invalid job or usage.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import anyio
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator import processes
from orchestrator.api import Orchestrator, RunResult
from orchestrator.display import RunView, render_summary, render_table
from orchestrator.job import load_job
from orchestrator.simulator import SimConfig, SimulatedVLLM
from protocol.errors import ConfigError, OrchestratorError, PluginLoadError
from protocol.inference_settings import InferenceSettings
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

    run = verbs.add_parser("run", help="run a job file, or plan and run a goal, to the end, in process")
    run.add_argument("job", metavar="JOB_OR_GOAL",
                     help="a job file (YAML), or a goal in words for the LLM planner")
    run.add_argument("--json", action="store_true", help="print one JSON object with run_id, state and tasks")
    run.add_argument("--worker", action="append", default=None, metavar="PLUGIN",
                     help="serve only these workers (entry point name or module:Class); repeatable")
    run.add_argument("--concurrency", type=int, default=8, help="tasks run at once per process (default: 8)")
    _llm_flags(run, fallback="; without one, work that needs a model runs on the built-in vLLM simulator")
    run.set_defaults(func=_cmd_run)

    plugins = verbs.add_parser("plugins", help="list installed worker plugins")
    plugins.set_defaults(func=_cmd_plugins)

    verbs.add_parser("sim-llm", add_help=False,
                     help="serve the vLLM simulator over HTTP (flags follow `vllm serve`; see sim-llm --help)")

    manager = verbs.add_parser("manager", help="run the manager process against Redis (one leads, others stand by)")
    _redis_flags(manager)
    manager.add_argument("--ledger", default=os.environ.get("ORCH_LEDGER", "orchestrator-ledger.db"),
                         help="SQLite ledger path (env ORCH_LEDGER; default ./orchestrator-ledger.db)")
    manager.add_argument("--name", default=None, help="manager name in logs and leases (default: manager-HOST-PID)")
    manager.add_argument("--max-queue", type=int, default=_env_int("ORCH_MAX_QUEUE"), metavar="N",
                         help="back-pressure: dispatch waits while a capability has N tasks waiting or in flight "
                              "(env ORCH_MAX_QUEUE; default: unbounded)")
    manager.add_argument("--manager-lease-s", type=float, default=5.0,
                         help="leadership lease; a standby takes over this long after the leader dies")
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

    submit = verbs.add_parser("submit", help="submit a job to the running manager; prints the run id")
    _redis_flags(submit)
    submit.add_argument("job", help="path to a job file (YAML)")
    submit.add_argument("--json", action="store_true", help="print JSON ({'run_id'}, or the final run with --wait)")
    submit.add_argument("--wait", action="store_true", help="block until the run ends; exit 0 accepted, 1 not")
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
    events.set_defaults(func=_cmd_events)

    watch = verbs.add_parser("watch", help="follow a run live as a tree of its tasks, then summarize it")
    _redis_flags(watch)
    watch.add_argument("run_id")
    watch.set_defaults(func=_cmd_watch)

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
        override.add_argument("--by", default=_default_person(), help="who decides (default: USER@HOST)")
        override.set_defaults(func=_cmd_override, action=verb)

    from orchestrator.fleet.cli import add_fleet_parser  # fleet up | status | render

    add_fleet_parser(verbs)
    return parser


def _exit_after_flag(parser: argparse.ArgumentParser, *aliases: str) -> None:
    parser.add_argument("--exit-after-s", *aliases, type=float, default=os.environ.get("ORCH_EXIT_AFTER_S") or None,
                        metavar="N", dest="exit_after_s",
                        help="exit 1 once Redis has been unreachable for N seconds (env ORCH_EXIT_AFTER_S; default: "
                             "wait for Redis however long it takes)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _default_person() -> str:
    return f"{os.environ.get('USER') or os.environ.get('USERNAME') or 'someone'}@{socket.gethostname()}"


def _llm_flags(parser: argparse.ArgumentParser, *, fallback: str = "") -> None:
    parser.add_argument("--llm-url", default=None, metavar="URL",
                        help=f"OpenAI-compatible server, e.g. http://host:8000/v1 (env ORCH_LLM_URL){fallback}")
    parser.add_argument("--model", default=None, help="served model name (env ORCH_LLM_MODEL; default: the first)")
    parser.add_argument("--api-key", default=None, help="the server's API key (env ORCH_LLM_API_KEY)")


def _llm_settings(args: argparse.Namespace) -> InferenceSettings | None:
    """The LLM server from flags or environment, or None when none is configured."""
    overrides = {k: v for k, v in (("url", args.llm_url), ("model", args.model), ("api_key", args.api_key)) if v}
    if not overrides.get("url") and not os.environ.get("ORCH_LLM_URL"):
        return None
    return InferenceSettings.from_env(**overrides)


def _observability_flags(parser: argparse.ArgumentParser) -> None:
    env_port = os.environ.get("ORCH_METRICS_PORT")
    parser.add_argument("--metrics-port", type=int, default=int(env_port) if env_port else None, metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (env ORCH_METRICS_PORT; "
                             "default: no endpoint)")
    parser.add_argument("--metrics-host", default=os.environ.get("ORCH_METRICS_HOST", "0.0.0.0"),
                        help="address the metrics endpoint binds (env ORCH_METRICS_HOST; default 0.0.0.0)")
    parser.add_argument("--trace", action="store_true",
                        help="send OpenTelemetry traces to the exporter OTEL_TRACES_EXPORTER names (default otlp, "
                             "to OTEL_EXPORTER_OTLP_ENDPOINT); needs orchestrator[tracing]")


def _observability(args: argparse.Namespace) -> processes.Observability:
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port must be a port number, got {args.metrics_port}")
    return processes.Observability(metrics_port=args.metrics_port, metrics_host=args.metrics_host, tracing=args.trace)


def _redis_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", default=None, metavar="URL",
                        help="Redis URL, redis:// or rediss://, password in the URL (env ORCH_REDIS_URL)")
    parser.add_argument("--namespace", default=os.environ.get("ORCH_NAMESPACE", "orch"),
                        help="key prefix shared by a fleet (env ORCH_NAMESPACE; default orch)")
    parser.add_argument("--lease-s", type=float, default=float(os.environ.get("ORCH_LEASE_S", "30")),
                        help="task lease: a dead worker's task is picked up this long after it died")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim-llm"]:
        from orchestrator.simulator.cli import serve  # its own flags, mirroring `vllm serve`

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        # Task groups wrap failures in exception groups; the user needs the one error that explains them.
        error = _our_error(exc)
        if error is None:
            raise
        print(f"orchestrator: error: {error}", file=sys.stderr)  # noqa: T201 - the CLI's own error channel
        return EXIT_USAGE if isinstance(error, ConfigError | PluginLoadError) else EXIT_FAILED
    return code


def _our_error(exc: BaseException) -> OrchestratorError | None:
    if isinstance(exc, OrchestratorError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _our_error(inner)) is not None:
                return found
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {args.concurrency}")
    console = Console(stderr=args.json)
    result = anyio.run(_run, args, console)
    if args.json:
        print(json.dumps(result.to_dict(), default=str))  # noqa: T201 - the --json contract is stdout
    return EXIT_ACCEPTED if result.accepted else EXIT_FAILED


def _is_job_file(arg: str) -> bool:
    return Path(arg).exists() or arg.endswith((".yaml", ".yml", ".json")) or ("\n" not in arg and os.sep in arg
                                                                           and " " not in arg)


def _needs_llm(job_path: str) -> bool:
    llm_capabilities = {name for name, ep in registry.available().items() if _plugin_needs_llm(ep.value)}
    return any(t.capability in llm_capabilities for t in load_job(job_path).tasks)


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
        if settings is None and (goal is not None or _needs_llm(args.job)):
            sim = await stack.enter_async_context(SimulatedVLLM(SimConfig(time_scale=0.05)))
            settings = InferenceSettings(url=sim.url, model=sim.model)
            simulated = True
            console.print("[yellow]No LLM server configured (--llm-url or ORCH_LLM_URL): using the built-in vLLM "
                          "simulator. Its answers are simulated.[/yellow]", highlight=False, soft_wrap=True)
        orch = await stack.enter_async_context(Orchestrator(workers=args.worker, concurrency=args.concurrency,
                                                            llm=settings))
        job = await orch.plan(goal) if goal is not None else args.job
        run = await orch.submit(job)
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
    if simulated:
        console.print("[yellow]note: every model answer in this run came from the vLLM simulator.[/yellow]",
                      highlight=False, soft_wrap=True)
    return result


def _cmd_manager(args: argparse.Namespace) -> int:
    if args.max_queue is not None and args.max_queue < 1:
        raise ConfigError(f"--max-queue must be at least 1, got {args.max_queue}")
    anyio.run(functools.partial(
        processes.run_manager, url=processes.redis_url(args.redis), ledger=Path(args.ledger),
        name=args.name or processes.default_name("manager"), namespace=args.namespace, lease_s=args.lease_s,
        manager_lease_s=args.manager_lease_s, llm=_llm_settings(args), observability=_observability(args),
        max_queue=args.max_queue, exit_after_s=args.exit_after_s))
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
        observability=_observability(args)))
    return EXIT_ACCEPTED


def _cmd_submit(args: argparse.Namespace) -> int:
    job = load_job(args.job)  # capabilities are the fleet's business; everything else is checked here

    async def go() -> int:
        async with _client_bus(args) as bus:
            run_id = await processes.submit_job(bus, job, source=args.job)
            if not args.wait:
                print(json.dumps({"run_id": run_id}) if args.json else run_id)  # noqa: T201 - CLI output
                return EXIT_ACCEPTED
            result = await processes.wait_for_run(bus, run_id)
        _print_run(result, as_json=args.json)
        return EXIT_ACCEPTED if result["state"] == "accepted" else EXIT_FAILED

    return anyio.run(go)


def _cmd_status(args: argparse.Namespace) -> int:
    async def go() -> dict[str, Any] | None:
        async with _client_bus(args) as bus:
            return await processes.fetch_status(bus, args.run_id)

    result = anyio.run(go)
    if result is None:
        raise ConfigError(f"unknown run {args.run_id!r} (no manager has reported it, or it expired)")
    _print_run(result, as_json=args.json)
    return EXIT_ACCEPTED


def _cmd_events(args: argparse.Namespace) -> int:
    async def go() -> list[Any]:
        async with _client_bus(args) as bus:
            return await processes.read_events(bus, args.run_id)

    events = anyio.run(go)
    if not events:
        raise ConfigError(f"no history for run {args.run_id!r} (unknown, or expired)")
    for event in events:
        if args.json:
            print(event.model_dump_json())  # noqa: T201 - CLI output
        else:
            print(_event_line(event))  # noqa: T201 - CLI output
    return EXIT_ACCEPTED


def _event_line(event: Any) -> str:
    stamp = datetime.fromtimestamp(event.time, tz=UTC).strftime("%H:%M:%S.%f")[:-3]
    where = f"{event.task_id}#{event.attempt}" if event.task_id else "run"
    change = f"{event.from_state} -> {event.to_state}" if event.kind == "transition" else event.kind
    extra = "  ".join(f"{k}={v}" for k, v in event.detail.items() if k in _SHOWN_DETAIL and v not in ("", None))
    return f"{event.seq:>5} {stamp} {where:<20} {event.event:<18} {change:<24} by {event.actor:<24} {extra}"


_SHOWN_DETAIL = ("verifier", "feedback", "reason", "guard", "error", "state", "message", "action")


def _cmd_watch(args: argparse.Namespace) -> int:
    console = Console()

    async def go() -> dict[str, Any]:
        async with _client_bus(args) as bus:
            view = RunView()
            with Live(render_table(view), console=console, refresh_per_second=4, transient=True) as live:
                async for event in processes.follow_events(bus, args.run_id):
                    view.apply(event)
                    live.update(render_table(view, wide=console.width >= 120))
            status = await processes.fetch_status(bus, args.run_id)
        if status is None:
            raise ConfigError(f"unknown run {args.run_id!r}")
        console.print(render_summary(view, status, wide=console.width >= 120))
        return status

    status = anyio.run(go)
    return EXIT_ACCEPTED if status["state"] == "accepted" else EXIT_FAILED


def _cmd_override(args: argparse.Namespace) -> int:
    async def go() -> None:
        async with _client_bus(args) as bus:
            await processes.send_override(bus, args.run_id, args.task_id or "", args.action, feedback=args.feedback,
                                          by=args.by)

    anyio.run(go)
    target = f"task {args.task_id!r} of run {args.run_id}" if args.task_id else f"run {args.run_id}"
    print(f"{args.action} sent for {target} by {args.by}")  # noqa: T201 - CLI output
    return EXIT_ACCEPTED


def _client_bus(args: argparse.Namespace) -> Any:
    return processes.open_bus(processes.redis_url(args.redis), namespace=args.namespace, lease_s=args.lease_s,
                              retry_budget_s=5.0)


def _print_run(result: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))  # noqa: T201 - the --json contract is stdout
        return
    console = Console()
    table = Table(title=f"run {result['run_id']}  {result.get('goal', '')}  [{result['state']}]", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for column in ("task", "capability", "state", "attempts", "output / reason"):
        table.add_column(column, overflow="fold")
    for t in result["tasks"]:
        last = t["reason"] if t["state"] in ("failed", "cancelled") else json.dumps(t["output"], default=str)
        table.add_row(t["id"], t["capability"], t["state"], str(t["attempts"]), last[:200])
    console.print(table)
    if result.get("reason"):
        console.print(f"reason: {result['reason']}")


def _cmd_plugins(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name, ep in sorted(registry.available().items()):
        rows.append({"capability": name, "target": ep.value, "package": ep.dist.name if ep.dist else ""})
    for row in rows:
        print(f"{row['capability']:<20} {row['target']:<50} {row['package']}")  # noqa: T201 - CLI output
    return EXIT_ACCEPTED


if __name__ == "__main__":
    sys.exit(main())
