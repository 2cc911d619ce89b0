"""The cached run summary is the same JSON as the run's summary, whatever changed since the last one."""

from __future__ import annotations

import json

import pytest

from orchestrator.job import parse_job
from orchestrator.records import RunRecord
from orchestrator.snapshots import BLOCK, Snapshots, Summary, _Packed
from protocol.states import TaskState


def test_a_cached_summary_follows_the_tasks_that_changed() -> None:
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": "a", "capability": "x"},
                                                          {"id": "b", "capability": "x"}]}))
    snapshots = Snapshots()
    assert json.loads(b"".join(snapshots.render(run, now=0.0))) == run.summary()
    run.tasks["a"].output, run.tokens = {"n": 1}, 7
    snapshots.changed(run.run_id, "a")
    assert json.loads(b"".join(snapshots.render(run, now=0.0))) == run.summary()
    run.tasks["b"].output = 2  # not reported as changed: the cached JSON stays until it is
    assert json.loads(b"".join(snapshots.render(run, now=0.0)))["tasks"][1]["output"] is None
    snapshots.changed(run.run_id, "b")
    assert json.loads(b"".join(snapshots.render(run, now=0.0))) == run.summary()


def test_a_big_summary_is_due_again_only_when_its_size_allows() -> None:
    small = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": "a", "capability": "x"}]}))
    big = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"} for i in range(2000)]}))
    snapshots = Snapshots(bytes_per_s=100_000.0)
    assert snapshots.due(big.run_id, 10.0)  # never rendered: due at once
    size = len(b"".join(snapshots.render(big, now=10.0)))
    assert size > 200_000  # about 2 s of the budget
    assert not snapshots.due(big.run_id, 10.0 + size / 100_000.0 - 0.01)
    assert snapshots.due(big.run_id, 10.0 + size / 100_000.0)
    snapshots.render(small, now=10.0)
    assert snapshots.due(small.run_id, 10.01)  # a few hundred bytes: due again at the next refresh
    snapshots.forget(big.run_id)
    assert snapshots.due(big.run_id, 10.0)


@pytest.mark.parametrize("tasks", [0, 1, 3])
def test_the_summary_is_valid_json_whatever_the_number_of_tasks(tasks: int) -> None:
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"} for i in range(tasks)]}))
    assert json.loads(b"".join(Snapshots().render(run, now=0.0))) == run.summary()


def test_rendered_parts_stay_the_summary_of_their_moment() -> None:
    # The bus may write a big summary's parts while the run moves on.
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": "a", "capability": "x"}]}))
    snapshots = Snapshots()
    parts = snapshots.render(run, now=0.0)
    before = run.summary()
    run.tasks["a"].output = "later"
    snapshots.changed(run.run_id, "a")
    snapshots.render(run, now=1.0)
    assert json.loads(b"".join(parts)) == before


def test_only_the_blocks_with_a_changed_task_are_rendered_again() -> None:
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"}
                                                          for i in range(2 * BLOCK + 10)]}))
    snapshots = Snapshots()
    snapshots.render(run, now=0.0)
    first = list(snapshots._runs[run.run_id].blocks)
    run.tasks[f"t{BLOCK + 3}"].output = "new"
    snapshots.changed(run.run_id, f"t{BLOCK + 3}")
    second = snapshots.render(run, now=1.0)
    assert json.loads(b"".join(second)) == run.summary()
    assert [a is b for a, b in zip(first, snapshots._runs[run.run_id].blocks, strict=True)] == [True, False, True]


def test_a_block_is_kept_compressed_until_a_task_of_it_changes_and_again_once_they_have_all_ended() -> None:
    # Rendered for the first time, a big run's blocks wait unchanged (most tasks are past the dispatch window);
    # one rendered again because a task changed stays inflated while a task of it is under way.
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"}
                                                          for i in range(2 * BLOCK + 10)]}))
    snapshots = Snapshots()
    for _ in snapshots.warm(run):
        pass
    blocks = snapshots._runs[run.run_id].blocks
    assert [isinstance(b.json, _Packed) for b in blocks] == [True, True, False]  # the last is not a whole block
    _end(run, snapshots, ["t0"])
    assert json.loads(b"".join(snapshots.render(run, now=0.0))) == run.summary()
    assert [isinstance(b.json, _Packed) for b in blocks] == [False, True, False]
    _end(run, snapshots, [f"t{i}" for i in range(BLOCK)])
    assert json.loads(b"".join(snapshots.render(run, now=1.0))) == run.summary()
    assert [isinstance(b.json, _Packed) for b in blocks] == [True, True, False]


def test_a_run_whose_task_list_grows_gets_its_last_block_rendered_again() -> None:
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"} for i in range(3)]}))
    snapshots = Snapshots()
    snapshots.render(run, now=0.0)
    extra = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": "late", "capability": "y"}]}))
    run.tasks["late"] = extra.tasks["late"]
    assert json.loads(b"".join(snapshots.render(run, now=1.0))) == run.summary()


def test_warming_renders_a_few_blocks_per_step_and_never_leaves_the_summary_stale() -> None:
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"}
                                                          for i in range(5 * BLOCK)]}))
    snapshots = Snapshots()
    steps = snapshots.warm(run, blocks_per_step=2)
    next(steps)  # two blocks rendered
    run.tasks["t0"].output = "changed after its block was rendered"
    snapshots.changed(run.run_id, "t0")
    assert sum(1 for _ in steps) == 1  # two more blocks, then the fifth and the end
    run.tasks[f"t{4 * BLOCK}"].output = "changed after the last block was rendered"
    snapshots.changed(run.run_id, f"t{4 * BLOCK}")
    assert json.loads(b"".join(snapshots.render(run, now=0.0))) == run.summary()


def _end(run: RunRecord, snapshots: Snapshots, task_ids: list[str], state: TaskState = TaskState.ACCEPTED) -> None:
    for task_id in task_ids:
        run.tasks[task_id].state, run.tasks[task_id].output = state, f"done {task_id} " + "w" * 40
        snapshots.changed(run.run_id, task_id)


def test_blocks_of_ended_tasks_are_kept_compressed_and_read_back_exactly() -> None:
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"}
                                                          for i in range(3 * BLOCK + 5)]}))
    snapshots = Snapshots()
    snapshots.render(run, now=0.0)
    _end(run, snapshots, [f"t{i}" for i in range(2 * BLOCK + 1)])  # two whole blocks and one task of the third
    summary = snapshots.render(run, now=1.0)
    assert json.loads(b"".join(summary)) == run.summary()
    assert isinstance(summary, Summary)
    assert summary.size == len(b"".join(summary))
    assert b"".join(summary[i] for i in range(len(summary))) == b"".join(summary[:])
    cache = snapshots._runs[run.run_id].blocks
    kept = [len(block.json.data) if isinstance(block.json, _Packed) else None for block in cache]
    assert kept[2:] == [None, None]  # a block with a task still under way stays as it is
    assert all(size is not None and size < block.size / 5 for size, block in zip(kept[:2], cache[:2], strict=True))
    # An ended task changes again only by a person's override, which is recorded like any change.
    _end(run, snapshots, ["t3"], TaskState.NOT_DONE)
    assert json.loads(b"".join(snapshots.render(run, now=2.0))) == run.summary()
    assert not isinstance(cache[0].json, _Packed)


def test_a_small_runs_ended_tasks_are_not_compressed() -> None:
    # zlib's set-up alone is a tenth of a one-task run's cost to the manager; a few tasks' JSON saves little.
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"} for i in range(3)]}))
    snapshots = Snapshots()
    _end(run, snapshots, list(run.tasks))
    assert json.loads(b"".join(snapshots.render(run, now=0.0))) == run.summary()
    assert not isinstance(snapshots._runs[run.run_id].blocks[0].json, _Packed)


def test_a_compressed_summary_is_due_again_by_its_inflated_size() -> None:
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"} for i in range(2000)]}))
    snapshots = Snapshots(bytes_per_s=100_000.0)
    _end(run, snapshots, list(run.tasks))
    size = len(b"".join(snapshots.render(run, now=10.0)))
    assert not snapshots.due(run.run_id, 10.0 + size / 100_000.0 - 0.01)
    assert snapshots.due(run.run_id, 10.0 + size / 100_000.0)
