"""What verification with redo and feedback buys, measured through the real orchestrator.

Run from the repository root::

    python benchmarks/quality.py simulated                 # (a) agents with known rates, beside the analytic values
    python benchmarks/quality.py simulated --tasks 500 --seed 2
    python benchmarks/quality.py real                      # (b) SmolLM2-135M on 60 checked tasks (needs scripts/real-model)
    python benchmarks/quality.py real --tasks 90 --max-attempts 3 --variants guards,quoted,no-guards
    python benchmarks/quality.py real --llm-url http://gpu-host:8000 --model agent-llm   # any OpenAI-compatible server

(a) **Simulated agents.** A worker (``CoinWorker``) is wrong with probability p at a first
attempt and right with probability r at a redo; a check (``noisy_check``) catches a wrong answer
with probability q and never rejects a right one. Every task goes through an in-process
``Orchestrator``: the manager, its verification chain, redo with feedback and its guards. Each row
prints the measured accepted-and-correct rate, false-accept rate and attempts per task beside the
analytic values:

    w_1 = p;  w_{k+1} = w_k·q·(1-r)          (attempt k is made and is wrong)
    P(accepted and correct) = (1-p) + Σ_{k<a} w_k·q·r
    P(false accept)         = Σ_{k≤a} w_k·(1-q)
    attempts per task       = 1 + Σ_{k<a} w_k·q

with ``a`` = max_attempts. The check's feedback quotes the rejected answer; the ``fixed feedback``
columns repeat the run with a fixed feedback text. Before the run engine, the ``repeated_feedback``
guard ended such a task at its second rejection (``a`` = min(max_attempts, 2)); now the guard leaves
a check's repeated verdict alone while the output changes, so both columns follow ``a`` =
max_attempts, and the replay checks it task by task. A deterministic check (q = 1)
accepts no wrong answer: the false-accept column is 0 there, measured and analytic.

(b) **The real small model.** ``llama-server`` with SmolLM2-135M-Instruct (``scripts/real-model``)
answers ``--tasks`` tasks (a third each: two-number arithmetic, JSON extraction, formatting)
through the built-in ``llm`` worker; each task's spec has a deterministic ``check`` with a
fixed feedback text. Printed per guard variant: first-attempt accuracy, accuracy after
verification with redo and feedback, attempts per task, tokens per accepted task, and what
stopped the failed tasks. The variants emulate guard settings without changing the manager:

- ``guards``: as the manager is today; the check's feedback is a fixed text, so a second
  rejection repeats it and the ``repeated_feedback`` guard ends the task; an unchanged answer ends
  it through the ``loop`` guard.
- ``quoted``: the feedback quotes the rejected answer, so a repeated feedback means a repeated
  answer: the ``repeated_feedback`` guard fires only where the ``loop`` guard would anyway.
  This is the behaviour the run engine is getting ("a repeated verdict from a deterministic check
  does not end a task while its output keeps changing").
- ``no-guards``: as ``quoted``, and the worker's output and the check's feedback carry the attempt
  number (which the check ignores), so neither the ``loop`` guard nor the ``repeated_feedback``
  guard can fire: every task gets its whole budget.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import Orchestrator
from orchestrator.api import RunResult
from orchestrator.records import TaskRecord
from protocol.logging import configure_logging
from workers.base import Task, Worker
from workers.builtin.llm import LLMConfig, LLMWorker

_HERE = __name__  # checks are referenced as f"{_HERE}:function", however this file was started


# -- (a) simulated agents with known rates ------------------------------------------------------------------


def _draw(seed: str, attempt: int, what: str) -> float:
    return random.Random(f"{seed}:{attempt}:{what}").random()


class CoinWorker(Worker):
    """Wrong with probability p at a first attempt; right with probability r at a redo."""

    capability = "coin"

    async def handle(self, task: Task) -> Any:
        params = task.input
        right = (_draw(params["seed"], task.attempt, "work") >= params["p"] if task.attempt == 1
                 else _draw(params["seed"], task.attempt, "work") < params["r"])
        return {"correct": right, "value": f"{'right' if right else 'wrong'}-{task.attempt}"}


def noisy_check(output: Any, task: TaskRecord) -> tuple[bool, str]:
    """Passes a right answer; catches a wrong one with probability q; feedback fixed or quoting the answer."""
    if output["correct"]:
        return True, ""
    params = task.input
    caught = _draw(params["seed"], task.attempt, "check") < params["q"]
    if not caught:
        return True, ""
    return False, ("the answer is wrong" if params["fixed_feedback"] else f"the answer {output['value']!r} is wrong")


@dataclass(frozen=True)
class Rates:
    """Analytic outcome rates of one task."""

    correct: float
    false_accept: float
    attempts: float


def analytic(p: float, r: float, q: float, max_attempts: int) -> Rates:
    """The closed form from the module docstring."""
    wrong, correct, false_accept, attempts = p, 1 - p, 0.0, 1.0
    for k in range(1, max_attempts + 1):
        false_accept += wrong * (1 - q)
        if k < max_attempts:
            correct += wrong * q * r
            attempts += wrong * q
            wrong = wrong * q * (1 - r)
    return Rates(correct, false_accept, attempts)


def replay(p: float, r: float, q: float, max_attempts: int, tasks: int, *, seed: int, attempts_made: int) -> Rates:
    """The same draws as ``CoinWorker`` and ``noisy_check``, followed by hand: what the orchestrator must do.

    ``attempts_made``: the attempts a task can get.
    """
    correct = false_accept = attempts = 0
    for i in range(tasks):
        key = _seed(seed, p, r, q, max_attempts, i)
        for k in range(1, attempts_made + 1):
            attempts += 1
            right = _draw(key, k, "work") >= p if k == 1 else _draw(key, k, "work") < r
            if right:
                correct += 1
                break
            if _draw(key, k, "check") >= q:
                false_accept += 1
                break
    return Rates(correct / tasks, false_accept / tasks, attempts / tasks)


def _seed(seed: int, p: float, r: float, q: float, max_attempts: int, i: int) -> str:
    return f"{seed}:{p}:{r}:{q}:{max_attempts}:{i}"


async def _simulated_run(p: float, r: float, q: float, max_attempts: int, tasks: int, *, fixed_feedback: bool,
                         seed: int) -> Rates:
    job = {"goal": "simulated agents", "budget": {"max_attempts": max_attempts, "max_tasks": tasks},
           "tasks": [{"id": f"t{i}", "capability": "coin",
                      "input": {"p": p, "r": r, "q": q, "seed": _seed(seed, p, r, q, max_attempts, i),
                                "fixed_feedback": fixed_feedback},
                      "spec": {"check": f"{_HERE}:noisy_check"}} for i in range(tasks)]}
    async with Orchestrator(workers=[CoinWorker()], concurrency=64) as orch:
        result = await orch.run(job)
    records = list(result.record.tasks.values())
    correct = sum(1 for t in records if t.state == "accepted" and t.output["correct"])
    false_accept = sum(1 for t in records if t.state == "accepted" and not t.output["correct"])
    return Rates(correct / tasks, false_accept / tasks, sum(t.attempt for t in records) / tasks)


SIMULATED_CASES = [  # (p, r, q, max_attempts)
    (0.3, 0.7, 0.9, 3),
    (0.3, 0.7, 0.9, 5),
    (0.5, 0.5, 0.8, 3),
    (0.5, 0.5, 1.0, 3),
    (0.7, 0.3, 0.6, 4),
    (0.7, 0.3, 1.0, 6),
    (0.2, 0.9, 0.5, 3),
    (0.5, 0.0, 1.0, 3),
]


async def simulated(tasks: int, seed: int) -> None:
    """Print table (a)."""
    print(f"(a) simulated agents through the orchestrator, {tasks} tasks per row: measured (analytic)\n")
    print("| p | r | q | max attempts | accepted and correct | false accepts | attempts/task "
          "| same as replay | fixed feedback: accepted and correct | fixed feedback: attempts/task "
          "| same as replay |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p, r, q, a in SIMULATED_CASES:
        got = await _simulated_run(p, r, q, a, tasks, fixed_feedback=False, seed=seed)
        want = analytic(p, r, q, a)
        guarded = await _simulated_run(p, r, q, a, tasks, fixed_feedback=True, seed=seed)
        want_guarded = analytic(p, r, q, a)  # a check repeating itself no longer ends the task
        same = "yes" if got == replay(p, r, q, a, tasks, seed=seed, attempts_made=a) else "NO"
        same_guarded = "yes" if guarded == replay(p, r, q, a, tasks, seed=seed, attempts_made=a) else "NO"
        print(f"| {p} | {r} | {q} | {a} | {got.correct:.3f} ({want.correct:.3f}) "
              f"| {got.false_accept:.3f} ({want.false_accept:.3f}) | {got.attempts:.2f} ({want.attempts:.2f}) | {same} "
              f"| {guarded.correct:.3f} ({want_guarded.correct:.3f}) "
              f"| {guarded.attempts:.2f} ({want_guarded.attempts:.2f}) | {same_guarded} |")
    print(f"\nOne standard error of a rate near 0.5 at {tasks} tasks: {0.5 / tasks ** 0.5:.3f}. 'same as replay': "
          "the orchestrator's outcome equals, task by task, the same random draws followed by hand.")


# -- (b) the real small model --------------------------------------------------------------------------------

_NAMES = ["Maria", "Ahmed", "Lena", "Kofi", "Yuki", "Pedro", "Anna", "Ravi", "Sofia", "Tom"]
_CITIES = ["Lyon", "Oslo", "Lima", "Accra", "Kyoto", "Porto", "Graz", "Pune", "Turin", "Leeds"]
_WORDS = ["orange", "window", "garden", "silver", "rocket", "planet", "bridge", "candle", "forest", "pencil"]


def make_tasks(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` tasks with deterministic checks: arithmetic, JSON extraction and formatting, in turn."""
    rng = random.Random(seed)
    tasks: list[dict[str, Any]] = []
    for i in range(n):
        kind = ("sum", "json", "format")[i % 3]
        if kind == "sum":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            instruction = f"What is {a} + {b}? Reply with the number only."
            expected: Any = a + b
        elif kind == "json":
            name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(18, 90)
            instruction = (f'Extract the person from this sentence as JSON with keys "name" (string) and "age" '
                           f'(number): "{name} is {age} years old and lives in {city}." Reply with the JSON only.')
            expected = {"name": name, "age": age}
        else:
            word = rng.choice(_WORDS)
            instruction = f'Write the word "{word}" in capital letters. Reply with that one word only.'
            expected = word.upper()
        tasks.append({"id": f"{kind}{i}", "kind": kind, "instruction": instruction, "expected": expected})
    return tasks


def _text(output: Any) -> str:
    return output["text"] if isinstance(output, dict) else str(output)


def _grade(kind: str, expected: Any, text: str) -> tuple[bool, str]:
    """(right, what was read from the answer)."""
    if kind == "sum":
        numbers = re.findall(r"-?\d+", text)
        got = numbers[-1] if numbers else ""
        return got == str(expected), got or text[:40]
    if kind == "json":
        match = re.search(r"\{.*\}", text, re.S)
        try:
            data = json.loads(match.group(0)) if match else None
        except ValueError:
            data = None
        ok = (isinstance(data, dict) and str(data.get("name", "")).strip() == expected["name"]
              and str(data.get("age", "")).strip() == str(expected["age"]))
        return ok, json.dumps(data) if data is not None else text[:60]
    word = text.strip().strip(".\"'`*")
    return word == expected, word[:40]


_FIXED = {"sum": "the final number is wrong, recompute",
          "json": 'the JSON is wrong: give {"name": ..., "age": ...} with the values from the sentence',
          "format": "that is not the word in capital letters only"}


# Grading data by task id: kept out of the job, since a task's config reaches the worker (and its prompt).
_GRADING: dict[str, dict[str, Any]] = {}


def real_check(output: Any, task: TaskRecord) -> tuple[bool, str]:
    """A deterministic check; its feedback is fixed, or quotes what was read when ``quote`` is set."""
    spec = _GRADING[task.id]
    right, read = _grade(spec["kind"], spec["expected"], _text(output))
    if right:
        return True, ""
    feedback = _FIXED[spec["kind"]]
    if spec["quote"]:
        feedback = f"{feedback} (you answered {read!r})"
    if spec["mark"]:  # no two verdicts alike: the repeated_feedback guard cannot fire
        feedback = f"attempt {task.attempt}: {feedback}"
    return False, feedback


class MarkedLLMWorker(LLMWorker):
    """The ``llm`` worker whose output also carries the attempt number, so no two attempts' outputs are equal."""

    async def handle(self, task: Task) -> Any:
        return {"text": await super().handle(task), "attempt": task.attempt}


VARIANTS = {"guards": (False, False), "quoted": (True, False), "no-guards": (True, True)}  # (quote, mark)


async def _real_run(server_settings: Any, tasks: list[dict[str, Any]], max_attempts: int, variant: str,
                    config: LLMConfig) -> dict[str, Any]:
    quote, mark = VARIANTS[variant]
    worker = (MarkedLLMWorker if mark else LLMWorker)(config)
    _GRADING.clear()
    _GRADING.update({t["id"]: {"kind": t["kind"], "expected": t["expected"], "quote": quote, "mark": mark}
                     for t in tasks})
    job = {"goal": "checked small tasks", "budget": {"max_attempts": max_attempts, "max_tasks": len(tasks)},
           "tasks": [{"id": t["id"], "capability": "llm", "instruction": t["instruction"],
                      "spec": {"check": f"{_HERE}:real_check"}} for t in tasks]}
    started = time.monotonic()
    async with Orchestrator(workers=[worker], llm=server_settings, concurrency=2) as orch:
        result: RunResult = await orch.run(job)
    records = list(result.record.tasks.values())
    first = sum(1 for t in records if t.attempts and (t.attempts[0].verdict or {}).get("passed"))
    accepted = [t for t in records if t.state == "accepted"]
    stopped = Counter(_guard(t.reason) for t in records if t.state != "accepted")
    return {"variant": variant, "tasks": len(records), "first": first / len(records),
            "final": len(accepted) / len(records), "attempts": statistics.mean(t.attempt for t in records),
            "tokens_per_accepted": sum(t.tokens for t in records) / max(1, len(accepted)),
            "stopped": dict(stopped), "seconds": time.monotonic() - started,
            "by_kind": {k: (sum(1 for t in records if _GRADING[t.id]["kind"] == k and t.state == "accepted"),
                            sum(1 for t in records if _GRADING[t.id]["kind"] == k)) for k in ("sum", "json", "format")}}


def _guard(reason: str) -> str:
    for prefix, name in (("stuck:", "repeated_feedback"), ("loop:", "loop"), ("failed verification", "attempts"),
                         ("worker failed", "worker error")):
        if reason.startswith(prefix):
            return name
    return reason[:40] or "?"


async def real(tasks: int, max_attempts: int, variants: list[str], seed: int, threads: int,
               temperature: float, max_tokens: int, llm_url: str | None, model: str | None) -> None:
    """Print table (b): on the cached SmolLM2 behind llama-server, or on the server at ``llm_url``."""
    from orchestrator.real_model import LlamaServer, RealModel
    from protocol.inference_settings import InferenceSettings

    task_list = make_tasks(tasks, seed)
    config = LLMConfig(max_tokens=max_tokens, temperature=temperature)
    if llm_url:
        settings = InferenceSettings.from_env(url=llm_url, model=model)
        rows = [await _real_run(settings, task_list, max_attempts, v, config) for v in variants]
        served = f"{model or 'the first model'} at {llm_url}"
    else:
        with LlamaServer(RealModel.find(), threads=threads, parallel=2, context=4096) as server:
            rows = [await _real_run(server.settings(), task_list, max_attempts, v, config) for v in variants]
        served = f"SmolLM2-135M-Instruct (Q4_1, llama-server, {threads} threads)"
    print(f"(b) {served}, {tasks} tasks, max_attempts={max_attempts}, temperature={temperature}, "
          f"max_tokens={max_tokens}\n")
    print("| variant | first attempt right | accepted after verify+redo | attempts/task | tokens per accepted task "
          "| sum / json / format accepted | failed tasks stopped by | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        kinds = " / ".join(f"{a}/{n}" for a, n in row["by_kind"].values())
        stopped = ", ".join(f"{k} {v}" for k, v in sorted(row["stopped"].items())) or "-"
        print(f"| {row['variant']} | {row['first']:.2f} | {row['final']:.2f} | {row['attempts']:.2f} "
              f"| {row['tokens_per_accepted']:.0f} | {kinds} | {stopped} | {row['seconds']:.0f} |")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    sim = sub.add_parser("simulated", help="(a) simulated agents with known rates")
    sim.add_argument("--tasks", type=int, default=2000)
    sim.add_argument("--seed", type=int, default=1)
    rm = sub.add_parser("real", help="(b) the real small model (needs scripts/real-model)")
    rm.add_argument("--tasks", type=int, default=60)
    rm.add_argument("--max-attempts", type=int, default=3)
    rm.add_argument("--variants", default="guards,quoted,no-guards")
    rm.add_argument("--seed", type=int, default=1)
    rm.add_argument("--threads", type=int, default=2)
    rm.add_argument("--temperature", type=float, default=0.7)
    rm.add_argument("--max-tokens", type=int, default=48)
    rm.add_argument("--llm-url", help="measure the OpenAI-compatible server here instead (e.g. a vLLM)")
    rm.add_argument("--model", help="with --llm-url: the served model (default: the first listed)")
    args = parser.parse_args()
    configure_logging("ERROR")
    if args.part == "simulated":
        anyio.run(simulated, args.tasks, args.seed)
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
        anyio.run(real, args.tasks, args.max_attempts, variants, args.seed, args.threads, args.temperature,
                  args.max_tokens, args.llm_url, args.model)


if __name__ == "__main__":
    main()
