"""How often the planner, worker and judge prompts get a usable answer from a small real model.

Run from the repository root, after ``scripts/real-model``::

    python benchmarks/usable_answers.py                 # 12 goals, 12 worker tasks, 16 judge cases
    python benchmarks/usable_answers.py --repeat 2

- planner: ``Planner.plan(goal)`` for each goal; usable at the first ask, usable within its
  ``max_asks`` (3), and the problems of the asks that were not.
- worker: the ``llm`` worker's prompt for an instruction with a spec; usable = not empty and not
  cut off at ``max_tokens``.
- judge: ``LLMJudge`` on answers known to be right or wrong; usable = a verdict matching the
  schema at the first ask; right = the verdict agrees with what is known.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.judge import LLMJudge
from orchestrator.planner import PlanError, Planner
from orchestrator.real_model import LlamaServer, RealModel
from orchestrator.records import TaskRecord
from protocol.errors import BadCompletion
from protocol.inference import InferenceClient
from protocol.logging import configure_logging
from workers.base import Task
from workers.builtin.llm import LLMConfig, LLMWorker

GOALS = [
    "write a haiku about redis",
    "write a short market brief on heat pumps",
    "plan a birthday party for ten children",
    "explain how a bicycle gear works to a child",
    "compare tea and coffee for a morning drink",
    "draft an email asking for a meeting next week",
    "summarise the benefits of unit tests",
    "write a limerick about a cat",
    "list five tips for learning a new language",
    "describe the water cycle in three steps",
    "suggest a name and slogan for a bakery",
    "outline a talk about climate change",
]

WORK = [
    ("Write a haiku about redis.", "Three lines of 5, 7 and 5 syllables."),
    ("List three uses of a database cache.", "Exactly three uses, one per line."),
    ("What is 17 + 25? Reply with the number only.", "The number 42."),
    ("Write one sentence about the sea.", "One sentence."),
    ("Give a title for a talk on heat pumps.", "A title of at most ten words."),
    ("Name two primary colours.", "Two colour names."),
    ("Translate 'good morning' into French.", "The French phrase."),
    ("Write a short slogan for a bakery.", "A slogan of at most eight words."),
    ("Explain in two sentences what a compiler does.", "Two sentences."),
    ("List the days of the weekend.", "Saturday and Sunday."),
    ("Write a greeting for a birthday card.", "One or two friendly sentences."),
    ("Give one tip for learning a language.", "One practical tip."),
]

JUDGE = [  # (instruction, description, answer, should pass)
    ("What is 17 + 25? Reply with the number only.", "The number 42.", "42", True),
    ("What is 17 + 25? Reply with the number only.", "The number 42.", "43", False),
    ("Name two primary colours.", "Two colour names.", "Red and blue.", True),
    ("Name two primary colours.", "Two colour names.", "A banana.", False),
    ("Translate 'good morning' into French.", "The French phrase.", "Bonjour", True),
    ("Translate 'good morning' into French.", "The French phrase.", "Good night", False),
    ("List the days of the weekend.", "Saturday and Sunday.", "Saturday, Sunday", True),
    ("List the days of the weekend.", "Saturday and Sunday.", "Monday", False),
    ("Write one sentence about the sea.", "One sentence.", "The sea is wide and blue.", True),
    ("Write one sentence about the sea.", "One sentence.", "", False),
    ("Give a title for a talk on heat pumps.", "A title of at most ten words.", "Heat Pumps for Homes", True),
    ("Give a title for a talk on heat pumps.", "A title of at most ten words.",
     "This is a very long title that goes on and on about many things at once", False),
    ("What is the capital of France?", "The city name.", "Paris", True),
    ("What is the capital of France?", "The city name.", "Berlin", False),
    ("Write the word cat in capital letters.", "The word in capitals.", "CAT", True),
    ("Write the word cat in capital letters.", "The word in capitals.", "cat", False),
]


async def measure(client: InferenceClient, repeat: int, worker_tokens: int) -> None:
    """Print the rates."""
    planner = Planner(client, capabilities=["llm"])
    first = within = repaired = on_topic = 0
    sizes: Counter[int] = Counter()
    problems: Counter[str] = Counter()
    started = time.monotonic()
    for goal in GOALS * repeat:
        try:
            job = await planner.plan(goal)
        except PlanError as exc:
            problems.update(_kind(p) for p in exc.problems)
            continue
        within += 1
        first += planner.asks == 1
        repaired += bool(planner.repairs)
        sizes[len(job.tasks)] += 1
        words = {w for w in goal.lower().split() if len(w) > 3}
        on_topic += all(words & set(t.instruction.lower().replace(".", " ").split()) for t in job.tasks)
    n = len(GOALS) * repeat
    print(f"planner: {first}/{n} usable at the first ask, {within}/{n} within {planner.max_asks} asks, "
          f"{repaired} of them repaired, {on_topic} with every instruction on the goal's words; tasks per plan "
          f"{dict(sorted(sizes.items()))} (max_tokens={planner.max_tokens}, {time.monotonic() - started:.0f} s); "
          f"problems of failed plans: {dict(problems)}")

    worker = LLMWorker(LLMConfig(max_tokens=worker_tokens))
    usable, reasons = 0, Counter[str]()
    started = time.monotonic()
    for i, (instruction, description) in enumerate(WORK * repeat):
        task = Task(run_id="bench", task_id=f"w{i}", attempt=1, capability="llm", instruction=instruction,
                    spec_description=description)
        result = await client.chat(worker.messages(task), max_tokens=worker_tokens)
        if not result.text.strip():
            reasons["empty"] += 1
        elif result.finish_reason == "length":
            reasons[f"cut off at {worker_tokens} tokens"] += 1
        else:
            usable += 1
    n = len(WORK) * repeat
    print(f"worker: {usable}/{n} usable (max_tokens={worker_tokens}, {time.monotonic() - started:.0f} s); "
          f"unusable: {dict(reasons)}")

    judge = LLMJudge(client, max_asks=1)
    usable = agree = passed_right = failed_wrong = 0
    started = time.monotonic()
    for instruction, description, answer, should_pass in JUDGE * repeat:
        record = TaskRecord(id="t", capability="llm", instruction=instruction, spec={"description": description})
        try:
            verdict = await judge(record, answer)
        except BadCompletion:
            continue
        usable += 1
        agree += verdict.passed == should_pass
        passed_right += verdict.passed and should_pass
        failed_wrong += not verdict.passed and not should_pass
    n = len(JUDGE) * repeat
    print(f"judge: {usable}/{n} usable at the first ask, {agree}/{n} agree with the known answer "
          f"(passes {passed_right}/{n // 2} right answers, fails {failed_wrong}/{n // 2} wrong ones; "
          f"max_tokens={judge.max_tokens}, {time.monotonic() - started:.0f} s)")


def _kind(problem: str) -> str:
    text = problem.split(": ", 1)[-1]
    for marker in ("cut off", "not valid JSON", "does not match the schema", "invalid plan", "cycle",
                   "unknown task"):
        if marker in text:
            return marker
    return text[:50]


async def main(args: argparse.Namespace) -> None:
    """Start the server and measure."""
    with LlamaServer(RealModel.find(), threads=args.threads, context=args.context) as server:
        async with InferenceClient(server.settings()) as client:
            await client.check()
            await measure(client, args.repeat, args.worker_tokens)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--worker-tokens", type=int, default=256)
    configure_logging("ERROR")
    anyio.run(main, parser.parse_args())
