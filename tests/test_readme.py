"""The README's embedding and plugin examples run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Orchestrator

ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no '{name}' example"
    return match.group(1)


def test_examples_are_short() -> None:
    for name in ("embed", "plugin"):
        code = example(name)
        assert len([line for line in code.splitlines() if line.strip()]) <= 20, name


def test_embedding_example_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    exec(compile(example("embed"), "README.md:embed", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "headline  #1 verify_done -> redo" in out
    assert "headline  #2 verify_done -> accepted" in out
    assert out.rstrip().splitlines()[-1].startswith("accepted ")


async def test_plugin_example_serves_a_job() -> None:
    namespace: dict[str, Any] = {"__name__": "readme_plugin"}
    exec(compile(example("plugin"), "README.md:plugin", "exec"), namespace)
    shout = namespace["ShoutWorker"]
    async with Orchestrator(workers=[shout(config={"suffix": "!!"})]) as orch:
        result = await orch.run({"goal": "be loud", "tasks": [
            {"id": "a", "capability": "shout", "input": "hello", "spec": {"expect": "HELLO!!"}}]})
    assert result.accepted, result.reason
    assert shout.has_own_verify()
