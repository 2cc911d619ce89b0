"""The simulated judge is fair: it checks what a description states that can be checked and passes otherwise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from orchestrator.simulator import DefaultPolicy
from orchestrator.simulator.judging import check_answer, claims
from protocol.inference import InferenceClient
from protocol.prompts import build_messages
from protocol.roles import ANSWER_HEADING, ROLE_JUDGE

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("description", "answer", "passed"),
    [
        ("A headline of at most 60 characters.", "25 primes below 100, summing to 1060", True),
        ("A headline of at most 60 characters.", "There are 25 primes below 100; they add up to 1060 and the "
                                                 "largest is 97.", False),
        ("A 60-character headline", "x" * 61, False),
        ("Between 3 and 5 words.", "Redis streams are fast.", True),
        ("Between 3 and 5 words.", "Fast.", False),
        ("Under 10 words", "one two three four five six seven eight nine ten", False),
        ("At least three concrete facts, one per line.", "1. a\n2. b\n3. c", True),
        ("At least three concrete facts, one per line.", "a single fact", False),
        ("Exactly 2 sentences.", "One. Two.", True),
        ("Exactly 2 sentences.", "One. Two. Three.", False),
        ("A haiku mentioning 'redis'.", "Redis holds the keys", True),
        ("A haiku mentioning 'redis'.", "Memory holds the keys", False),
        ("Answer as a JSON object.", '{"a": 1}', True),
        ("Answer as a JSON object.", "a: 1", False),
        ("A short, friendly reply.", "ok", True),  # nothing checkable: pass
        ("", "anything", True),
    ],
)
def test_checks_what_the_description_states(description: str, answer: str, passed: bool) -> None:
    reasons, corrections = check_answer(description, answer)
    assert (not reasons) is passed
    assert len(corrections) == len(reasons)


def test_short_answers_pass_when_nothing_asks_for_length() -> None:
    assert claims("A recommendation that cites the facts from t1.") == []
    verdict = DefaultPolicy.judge(f"{ANSWER_HEADING}\nUse Redis.", "A recommendation.")
    assert verdict["passed"] is True


async def test_judge_reads_the_description_from_the_spec(inference_client: InferenceClient) -> None:
    for spec in ("A headline of at most 20 characters.", {"description": "A headline of at most 20 characters."}):
        msgs = build_messages(system="You verify.", role=ROLE_JUDGE, spec=spec,
                              variable=f"{ANSWER_HEADING}\nA headline that is clearly longer than twenty characters")
        verdict = json.loads((await inference_client.chat(msgs)).text)
        assert verdict["passed"] is False
        assert "characters" in verdict["reasons"][0]
        assert verdict["corrections"] == ["Shorten it to at most 20 characters."]


@pytest.mark.slow
async def test_quickstart_ends_accepted_against_a_real_sim_llm() -> None:
    orchestrator = [sys.executable, "-m", "orchestrator.cli"]
    async with await anyio.open_process([*orchestrator, "sim-llm", "--port", "0", "--time-scale", "0.01"],
                                        stderr=subprocess.STDOUT, cwd=ROOT) as sim:
        assert sim.stdout is not None
        seen = b""
        with anyio.fail_after(30):
            while not (m := re.search(rb"http://127\.0\.0\.1:\d+", seen)):
                seen += await sim.stdout.receive()
        try:
            with anyio.fail_after(120):
                run = await anyio.run_process([*orchestrator, "run", "examples/quickstart.yaml", "--llm-url",
                                               m.group().decode(), "--json"], cwd=ROOT, check=False)
        finally:
            sim.terminate()
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    result = json.loads(run.stdout)
    assert result["state"] == "accepted"
    headline = next(t for t in result["tasks"] if t["id"] == "headline")
    assert headline["state"] == "accepted"
    assert len(headline["output"]) <= 60
    assert headline["tokens"] > 0  # the judge (an LLM call to sim-llm) ran
