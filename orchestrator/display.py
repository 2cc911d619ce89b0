"""Turn a run's events into a live table on a terminal, and a summary at the end."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from protocol.history import (
    Dispatched,
    DispatchHeld,
    HistoryEvent,
    OverrideGiven,
    OverrideRefused,
    ProgressNoted,
    RunFinished,
    RunFold,
    RunStarted,
    TaskFold,
    Transitioned,
    VerdictGiven,
    WaitingChanged,
)

__all__ = ("WIDE_COLUMNS", "RunView", "event_line", "render_summary", "render_table")

# Below this terminal width the table drops the capability, worker and tokens columns, and says so.
WIDE_COLUMNS = 120
HIDDEN_WHEN_NARROW = ("capability", "worker", "tokens")

STATE_STYLE = {
    "not_done": "cyan", "done": "blue", "verify_done": "magenta", "redo": "yellow",
    "accepted": "bold green", "failed": "bold red", "cancelled": "dim",
}


# The display is a fold of the run's history, like every other reader of it.
RunView = RunFold
TaskView = TaskFold


def _elapsed(task: TaskView, now: float) -> str:
    if task.started is None:
        return ""
    return f"{(task.finished or now) - task.started:.2f}s"


def _hidden_note(width: int | None) -> str:
    size = f"{width} columns" if width is not None else "narrow"
    *first, last = HIDDEN_WHEN_NARROW
    return f"{', '.join(first)} and {last} hidden: terminal {size}, shown from {WIDE_COLUMNS}"


def render_table(view: RunView, now: float | None = None, outputs: dict[str, Any] | None = None, *,
                 wide: bool = True, width: int | None = None) -> Table:
    """The run as a tree: each task under the tasks it depends on, with state, attempt, worker, elapsed time,
    tokens, and the latest note (or the output, at the end).

    ``wide=False`` drops the capability, worker and tokens columns and says so under the table
    (``width``, the terminal's, goes in that note). ``width`` alone decides ``wide`` when given.
    """
    now = now or time.time()
    if width is not None:
        wide = width >= WIDE_COLUMNS
    table = Table(title=f"run {view.run_id}  {view.goal}", title_justify="left", box=box.SIMPLE_HEAD,
                  caption=None if wide else _hidden_note(width), caption_justify="left")
    for column in ("task", "capability", "state", "attempt", "elapsed") if wide else ("task", "state", "try", "time"):
        table.add_column(column, no_wrap=True)
    if wide:
        table.add_column("worker", no_wrap=True)
        table.add_column("tokens", no_wrap=True, justify="right")
    table.add_column("output" if outputs is not None else "note", overflow="fold", min_width=24, max_width=80)
    depth = _depths(view)
    for task in _tree_order(view, depth):
        last = task.waiting.describe() if task.waiting is not None else task.note
        if outputs is not None and task.state == "accepted":
            last = _clip(outputs.get(task.id))
        if task.guard:
            last = f"[{task.guard}] {last}"
        name = ("  " * depth.get(task.id, 0) + "└ " if depth.get(task.id, 0) else "") + task.id
        state = Text(str(task.state), style=STATE_STYLE.get(task.state, ""))
        cells: list[str | Text] = ([Text(name), Text(task.capability), state] if wide else [Text(name), state])
        cells += [str(task.attempt or ""), _elapsed(task, now)]
        if wide:
            cells += [Text(task.worker), str(task.tokens or "")]
        table.add_row(*cells, Text(last))  # Text, not markup: outputs and feedback may hold [brackets]
    return table


def _tree_order(view: RunView, depth: dict[str, int]) -> list[TaskView]:
    """Tasks in tree order: each right under the dependency that puts it deepest (its tree parent)."""
    children: dict[str, list[TaskView]] = {}
    roots: list[TaskView] = []
    for task in view.tasks.values():
        known = [d for d in task.depends_on if d in view.tasks]
        if not known:
            roots.append(task)
        else:
            parent = max(known, key=lambda d: depth.get(d, 0))  # max keeps the first of equals
            children.setdefault(parent, []).append(task)
    order: list[TaskView] = []

    def visit(task: TaskView) -> None:
        order.append(task)
        for child in children.get(task.id, ()):
            visit(child)

    for root in roots:
        visit(root)
    return order


def _depths(view: RunView) -> dict[str, int]:
    """How many dependency levels sit above each task (0 for tasks that depend on nothing)."""
    depth: dict[str, int] = {}

    def of(task_id: str, seen: frozenset[str] = frozenset()) -> int:
        if task_id in depth:
            return depth[task_id]
        task = view.tasks.get(task_id)
        deps = [d for d in (task.depends_on if task else ()) if d not in seen]
        depth[task_id] = 1 + max((of(d, seen | {task_id}) for d in deps), default=-1)
        return depth[task_id]

    for task_id in view.tasks:
        of(task_id)
    return depth


def _clip(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_summary(view: RunView, result: dict[str, Any], *, wide: bool = True, width: int | None = None) -> Group:
    """The closing summary: the final table and one line on how the run ended."""
    counts: dict[str, int] = {}
    for t in result["tasks"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    redos = sum(t.redos for t in view.tasks.values())
    style = STATE_STYLE.get(result["state"], "")
    line = Text.assemble(("run ", ""), (result["state"], style),
                         (f"  {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}; {redos} redo(s)", ""))
    if result.get("held"):
        line.append(f"; {result['held']} held by the dispatch window")
    for entry in view.redo_log:
        line.append(f"\n  {entry}")  # Text.append takes plain text, so brackets in feedback stay
    if result.get("reason"):
        line.append(f"\nreason: {result['reason']}")
    outputs = {t["id"]: t["output"] for t in result["tasks"]}
    return Group(render_table(view, outputs=outputs, wide=wide, width=width), line)


def event_line(event: HistoryEvent) -> str:
    """One history event as a line of ``orchestrator events``."""
    stamp = datetime.fromtimestamp(event.time, tz=UTC).strftime("%H:%M:%S.%f")[:-3]
    where = f"{event.task_id}#{event.attempt}" if event.task_id else "run"
    body = event.body
    name: str = body.kind
    change = extra = ""
    match body:
        case Transitioned():
            name, change = str(body.event), f"{body.from_state} -> {body.to_state}"
            extra = _pairs(guard=body.guard, reason=body.reason, error=body.error,
                           verifier=body.verdict.verifier if body.verdict else None,
                           feedback=body.verdict.feedback if body.verdict else None)
        case VerdictGiven():
            change = f"{body.stage}: {'pass' if body.passed else 'reject'}"
            extra = _pairs(verifier=body.verifier, feedback=body.feedback)
        case Dispatched():
            change = body.capability
        case WaitingChanged():
            change = body.waiting.describe() if body.waiting is not None else "moving"
        case OverrideGiven():
            change, extra = body.action, _pairs(feedback=body.feedback)
        case OverrideRefused():
            change, extra = body.action, _pairs(reason=body.reason)
        case ProgressNoted():
            extra = _pairs(message=body.message)
        case RunFinished():
            change, extra = str(body.state), _pairs(reason=body.reason)
        case RunStarted():
            change = f"{len(body.tasks)} task(s)"
        case DispatchHeld():
            change = f"{body.held} task(s) held" if body.held else "none held"
            extra = _pairs(window=body.window)
    return f"{event.seq:>5} {stamp} {where:<20} {name:<18} {change:<24} by {event.actor:<24} {extra}".rstrip()


def _pairs(**values: object) -> str:
    return "  ".join(f"{k}={v}" for k, v in values.items() if v not in ("", None))
