"""Turn a run's events into a live table on a terminal, and a summary at the end."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from orchestrator.records import Event

__all__ = ("RunView", "render_summary", "render_table")

STATE_STYLE = {
    "not_done": "cyan", "done": "blue", "verify_done": "magenta", "redo": "yellow",
    "accepted": "bold green", "failed": "bold red", "cancelled": "dim",
}


@dataclass(slots=True)
class TaskView:
    """What the display knows about one task, folded from events."""

    id: str
    capability: str = ""
    state: str = "not_done"
    attempt: int = 0
    worker: str = ""
    started: float | None = None
    finished: float | None = None
    note: str = ""
    redos: int = 0
    tokens: int = 0
    depends_on: tuple[str, ...] = ()
    guard: str = ""


@dataclass(slots=True)
class RunView:
    """A run as seen through its events; feed it events in order."""

    run_id: str = ""
    goal: str = ""
    state: str = "running"
    reason: str = ""
    tasks: dict[str, TaskView] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    redo_log: list[str] = field(default_factory=list)

    def apply(self, event: Event) -> None:
        """Fold one event into the view."""
        self.run_id = event.run_id
        if event.kind == "run":
            if event.event == "run_started":
                self.goal = str(event.detail.get("goal", ""))
                self.started = event.time
                for t in event.detail.get("tasks", ()):
                    self.tasks[t["id"]] = TaskView(t["id"], capability=t.get("capability", ""),
                                                   depends_on=tuple(t.get("depends_on", ())))
            elif event.event == "run_finished":
                self.state = str(event.detail.get("state", ""))
                self.reason = str(event.detail.get("reason", ""))
            return
        task = self.tasks.setdefault(event.task_id, TaskView(event.task_id))
        task.attempt = max(task.attempt, event.attempt)
        if event.kind == "dispatch":
            task.capability = str(event.detail.get("capability", task.capability))
            task.started = task.started or event.time
        elif event.kind == "progress":
            task.note = str(event.detail.get("message", ""))
        elif event.kind == "note" and event.event == "awaiting_approval":
            task.note = "waiting for a person to approve"
        elif event.kind == "override":
            feedback = event.detail.get("feedback") or event.detail.get("reason") or ""
            task.note = f"{event.event} by {event.actor}" + (f": {feedback}" if feedback else "")
        elif event.kind == "transition":
            task.state = event.to_state
            if event.event == "done":
                task.worker = event.actor
                task.tokens += int(event.detail.get("tokens", 0) or 0)
            if event.event == "reject":
                task.redos += 1
                task.note = f"redo: {event.detail.get('feedback', '')}"
                self.redo_log.append(f"{task.id} attempt {event.attempt} rejected by "
                                     f"{event.detail.get('verifier') or event.actor}: {event.detail.get('feedback', '')}")
            elif event.to_state in ("failed", "cancelled"):
                task.note = str(event.detail.get("reason", ""))
                task.guard = str(event.detail.get("guard", ""))
            elif event.to_state == "accepted":
                task.note = ""
            if event.to_state in ("accepted", "failed", "cancelled"):
                task.finished = event.time


def _elapsed(task: TaskView, now: float) -> str:
    if task.started is None:
        return ""
    return f"{(task.finished or now) - task.started:.2f}s"


def render_table(view: RunView, now: float | None = None, outputs: dict[str, Any] | None = None, *,
                 wide: bool = True) -> Table:
    """The run as a tree: each task under the tasks it depends on, with state, attempt, worker, elapsed time,
    tokens, and the latest note (or the output, at the end)."""
    now = now or time.time()
    table = Table(title=f"run {view.run_id[:12]}  {view.goal}", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("task", "capability", "state", "attempt", "elapsed") if wide else ("task", "state", "try", "time"):
        table.add_column(column, no_wrap=True)
    if wide:
        table.add_column("worker", no_wrap=True)
        table.add_column("tokens", no_wrap=True, justify="right")
    table.add_column("output" if outputs is not None else "note", overflow="fold", min_width=24, max_width=80)
    depth = _depths(view)
    for task in _tree_order(view, depth):
        last = task.note
        if outputs is not None and task.state == "accepted":
            last = _clip(outputs.get(task.id))
        if task.guard:
            last = f"[{task.guard}] {last}"
        name = ("  " * depth.get(task.id, 0) + "└ " if depth.get(task.id, 0) else "") + task.id
        state = Text(task.state, style=STATE_STYLE.get(task.state, ""))
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


def render_summary(view: RunView, result: dict[str, Any], *, wide: bool = True) -> Group:
    """The closing summary: the final table and one line on how the run ended."""
    counts: dict[str, int] = {}
    for t in result["tasks"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    redos = sum(t.redos for t in view.tasks.values())
    style = STATE_STYLE.get(result["state"], "")
    line = Text.assemble(("run ", ""), (result["state"], style),
                         (f"  {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}; {redos} redo(s)", ""))
    for entry in view.redo_log:
        line.append(f"\n  {entry}")  # Text.append takes plain text, so brackets in feedback stay
    if result.get("reason"):
        line.append(f"\nreason: {result['reason']}")
    outputs = {t["id"]: t["output"] for t in result["tasks"]}
    return Group(render_table(view, outputs=outputs, wide=wide), line)
