"""``watch`` rendering: a recorded run replayed through the display, frame by frame, against a snapshot."""

from __future__ import annotations

import io
import json
from pathlib import Path

import anyio
from rich.console import Console

from orchestrator.display import RunView, render_summary, render_table
from orchestrator.processes import ended_status
from orchestrator.records import Event
from protocol.bus import MemoryBus
from protocol.keys import run_snapshot_key

DATA = Path(__file__).parent / "data"
NOW = 1_800_000_010.0  # after the last recorded event, so elapsed times are fixed


def recorded() -> list[Event]:
    lines = (DATA / "recorded_run.jsonl").read_text().splitlines()
    return [Event.model_validate(json.loads(line)) for line in lines]


def frames() -> tuple[list[str], RunView]:
    view = RunView()
    out = []
    for event in recorded():
        view.apply(event)
        console = Console(record=True, width=130, color_system=None, file=io.StringIO())
        console.print(render_table(view, now=NOW))
        out.append(console.export_text())
    return out, view


def final(view: RunView) -> str:
    tasks = [{"id": t.id, "state": t.state, "output": f"{t.id}: a complete answer" if t.state == "accepted" else None}
             for t in view.tasks.values()]
    console = Console(record=True, width=130, color_system=None, file=io.StringIO())
    console.print(render_summary(view, {"state": view.state, "reason": view.reason, "tasks": tasks}))
    return console.export_text()


def test_the_first_frame_shows_every_task_as_a_tree_before_anything_ran() -> None:
    first = frames()[0][0]
    assert "Write the quarterly report" in first
    for line in ("research", "└ draft", "stuck", "└ publish"):
        assert line in first
    assert first.count("not_done") == 4


def test_frames_follow_the_state_machine_and_show_why_a_task_was_redone_or_failed() -> None:
    all_frames, _ = frames()
    draft_rows = [next(line for line in frame.splitlines() if "draft" in line) for frame in all_frames]
    seen = [state for row in draft_rows for state in ("not_done", "verify_done", "redo", "accepted") if f" {state} " in row]
    compact = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
    assert compact[:2] == ["not_done", "verify_done"]
    assert "redo" in compact
    assert compact[-1] == "accepted"
    redo_frame = next(frame for frame in all_frames if " redo " in next(
        line for line in frame.splitlines() if "draft" in line))
    assert "redo: schema check failed" in redo_frame
    last = all_frames[-1]
    stuck = next(line for line in last.splitlines() if line.strip().startswith("stuck"))
    assert " failed " in stuck
    assert "[attempts] worker failed (attempt 2 of 2)" in stuck  # which guard stopped it
    assert " cancelled " in next(line for line in last.splitlines() if "publish" in line)


def test_the_closing_summary_matches_the_snapshot() -> None:
    _, view = frames()
    assert final(view) == (DATA / "watch_final.txt").read_text()


def summary_at(view: RunView, width: int) -> str:
    tasks = [{"id": t.id, "state": t.state, "output": f"{t.id}: a complete answer" if t.state == "accepted" else None}
             for t in view.tasks.values()]
    console = Console(record=True, width=width, color_system=None, file=io.StringIO())
    console.print(render_summary(view, {"state": view.state, "reason": view.reason, "tasks": tasks}, width=width))
    return console.export_text()


def test_a_narrow_terminal_says_which_columns_it_hid_and_why() -> None:
    _, view = frames()
    narrow = summary_at(view, 100)
    assert "capability, worker and tokens hidden: terminal 100 columns, shown from 120" in narrow
    header = next(line for line in narrow.splitlines() if line.strip().startswith("task"))
    for column in ("capability", "worker", "tokens"):
        assert column not in header
    assert narrow == (DATA / "watch_final_narrow.txt").read_text()
    wide = summary_at(view, 130)
    assert "hidden" not in wide
    assert wide == (DATA / "watch_final.txt").read_text()  # the wide table is unchanged


# -- the final summary after a followed run ends ----------------------------------------------------


async def test_a_run_whose_history_ended_gets_its_final_summary_once_the_manager_publishes_it() -> None:
    bus = MemoryBus()
    key = run_snapshot_key("r1")
    await bus.put_value(key, json.dumps({"run_id": "r1", "state": "running", "tasks": []}).encode())

    async def publish_final() -> None:
        await anyio.sleep(0.3)  # the manager publishes the summary a moment after the history's end
        await bus.put_value(key, json.dumps({"run_id": "r1", "state": "accepted", "tasks": []}).encode())

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_final)
        status = await ended_status(bus, "r1", within_s=10)
    assert status is not None
    assert status["state"] == "accepted"


async def test_a_summary_that_never_catches_up_is_returned_as_it_is_after_the_wait() -> None:
    bus = MemoryBus()
    await bus.put_value(run_snapshot_key("r1"), json.dumps({"run_id": "r1", "state": "running"}).encode())
    status = await ended_status(bus, "r1", within_s=0.2)
    assert status == {"run_id": "r1", "state": "running"}  # watch then exits 3 (not ended), as before
    assert await ended_status(bus, "unknown", within_s=0.2) is None


def test_the_summary_line_says_how_many_tasks_the_dispatch_window_holds() -> None:
    _, view = frames()
    tasks = [{"id": t.id, "state": t.state, "output": None} for t in view.tasks.values()]
    console = Console(record=True, width=130, color_system=None, file=io.StringIO())
    console.print(render_summary(view, {"state": "running", "reason": "", "tasks": tasks, "held": 7}))
    assert "7 held by the dispatch window" in console.export_text()
    console = Console(record=True, width=130, color_system=None, file=io.StringIO())
    console.print(render_summary(view, {"state": "running", "reason": "", "tasks": tasks, "held": 0}))
    assert "held" not in console.export_text()
