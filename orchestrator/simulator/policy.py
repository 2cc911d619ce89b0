"""Scripted answers: the ``Policy`` protocol, a regex rules policy and the default role-playing policy."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from protocol.roles import ANSWER_HEADING, FEEDBACK_HEADING, GOAL_HEADING, INSTRUCTION_HEADING, Role, detect_role

from .judging import check_answer, claims

__all__ = ("Answer", "DefaultPolicy", "Policy", "RulesPolicy", "SimRequest")

Answer = str | dict[str, Any] | list[Any]


@dataclass(frozen=True)
class SimRequest:
    """The parsed request a policy answers."""

    endpoint: str
    model: str
    messages: tuple[dict[str, Any], ...]
    prompt: str
    body: dict[str, Any] = field(repr=False)
    schema: dict[str, Any] | None = None

    @property
    def system(self) -> str:
        """All system messages, joined."""
        return "\n".join(_text(m) for m in self.messages if m.get("role") == "system")

    @property
    def last_user(self) -> str:
        """The last user message (or the raw prompt on /v1/completions)."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return _text(m)
        return self.prompt

    @property
    def role(self) -> Role | None:
        """The agent role named by a marker in the system prompt."""
        return detect_role(self.system)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


@runtime_checkable
class Policy(Protocol):
    """Anything that turns a request into an answer: text, or a JSON value for structured output."""

    def __call__(self, request: SimRequest) -> Answer: ...


class RulesPolicy:
    """First rule whose regex matches the last user message wins; answers may be callables."""

    def __init__(
        self,
        rules: Sequence[tuple[str, Answer | Callable[[SimRequest, re.Match[str]], Answer]]],
        *,
        fallback: Policy | None = None,
    ) -> None:
        self._rules = [(re.compile(p, re.IGNORECASE | re.DOTALL), a) for p, a in rules]
        self._fallback = fallback or DefaultPolicy()

    def __call__(self, request: SimRequest) -> Answer:
        """Answer by the first matching rule, else by the fallback policy."""
        text = request.last_user
        for pattern, answer in self._rules:
            match = pattern.search(text)
            if match:
                return answer(request, match) if callable(answer) else answer
        return self._fallback(request)


def _after(heading: str, text: str) -> str:
    """The text after ``heading`` up to the next blank line, or the whole text when absent."""
    idx = text.find(heading)
    if idx < 0:
        return text.strip()
    return text[idx + len(heading) :].strip().split("\n\n", 1)[0].strip()


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


_DRAFT_NOTE = "(Draft: details to follow.)"
_SPEC_HEADING = "Spec:\n"


class DefaultPolicy:
    """Plays planner, worker and judge (by system-prompt marker) well enough for a demo; echoes otherwise.

    - planner: a 3-4 task JSON plan for the goal; one task's instruction asks for something "brief".
    - worker: a short plausible answer; a first attempt at a "brief" instruction is a deficient draft,
      and a prompt carrying verifier feedback gets an improved answer.
    - judge: checks what the spec's description states that can be checked (``judging``), passes otherwise.
    """

    def __call__(self, request: SimRequest) -> Answer:
        """Answer according to the role marker."""
        role = request.role
        if role == "planner":
            return self.plan(_after(GOAL_HEADING, request.last_user))
        if role == "worker":
            return self.work(request.last_user)
        if role == "judge":
            return self.judge(request.last_user, _description(request.system))
        return f"Simulated answer to: {request.last_user.strip()[:200]}"

    @staticmethod
    def plan(goal: str) -> dict[str, Any]:
        """A task plan for ``goal``: research, a brief summary, analysis, and a final synthesis."""
        goal = " ".join(goal.split())[:160] or "the goal"
        tasks: list[dict[str, Any]] = [
            {"id": "t1", "instruction": f"List the key facts and constraints about: {goal}", "depends_on": [],
             "description": "At least three concrete facts or constraints, one per line."},
            {"id": "t2", "instruction": f"Write a brief summary of the main options for: {goal}", "depends_on": [],
             "description": "A summary naming at least two options with one trade-off each."},
            {"id": "t3", "instruction": f"Compare the options and recommend one for: {goal}",
             "depends_on": ["t1", "t2"], "description": "A recommendation that cites the facts from t1."},
        ]
        if _digest(goal) % 2 == 0:
            tasks.append({"id": "t4", "instruction": f"Write the final answer for: {goal}",
                          "depends_on": ["t3"], "description": "A final answer of a short paragraph."})
        return {"tasks": [
            {"id": t["id"], "capability": "llm", "instruction": t["instruction"], "depends_on": t["depends_on"],
             "spec": {"description": t["description"]}}
            for t in tasks
        ]}

    @staticmethod
    def work(prompt: str) -> str:
        """A worker answer for the instruction in ``prompt``."""
        instruction = _after(INSTRUCTION_HEADING, prompt)
        topic = " ".join(instruction.split())[:160]
        if FEEDBACK_HEADING in prompt:
            return (
                f"Revised answer for: {topic}\n"
                "1. The first point states the main fact plainly and gives the reason it matters.\n"
                "2. The second point names an alternative and the trade-off it carries against the first.\n"
                "3. The third point draws a conclusion from the two and says what to do next.\n"
                "This revision addresses the verifier feedback by adding concrete points and a conclusion."
            )
        if re.search(r"\bbrief\b", instruction, re.IGNORECASE):
            return f"{re.sub(r'[;,]', '', topic)}: it depends. {_DRAFT_NOTE}"  # one item, whatever the topic
        return (
            f"Answer for: {topic}\n"
            "1. The key fact is stated first, with the constraint that follows from it.\n"
            "2. A second consideration is weighed against the first, with its main trade-off.\n"
            "3. The conclusion follows from both points and names a clear next step to take."
        )

    @staticmethod
    def judge(prompt: str, description: str = "") -> dict[str, Any]:
        """A verdict on the answer under ``ANSWER_HEADING`` (or the whole prompt) against ``description``.

        Fair by construction: it checks only what the description states that a program can check
        (lengths in characters or words, counts of lines, sentences or items, required phrases,
        JSON), and passes an answer that meets all of it, or any answer when nothing is checkable.
        """
        idx = prompt.find(ANSWER_HEADING)
        answer = (prompt[idx + len(ANSWER_HEADING) :] if idx >= 0 else prompt).strip()
        reasons, corrections = check_answer(description, answer)
        if reasons:
            return {"passed": False, "reasons": reasons, "corrections": corrections}
        checked = len(claims(description))
        why = (f"The answer meets the {checked} checkable requirement(s) of the spec." if checked
               else "The spec states nothing the simulated judge can check; the answer is accepted.")
        return {"passed": True, "reasons": [why], "corrections": []}


def _description(system: str) -> str:
    """The spec's description from a system prompt laid out by ``protocol.prompts.build_messages``."""
    idx = system.find(_SPEC_HEADING)
    if idx < 0:
        return ""
    spec = system[idx + len(_SPEC_HEADING) :].split("\n\nContext:\n", 1)[0].strip()
    try:
        data = json.loads(spec)
    except ValueError:
        return spec
    if isinstance(data, dict):
        value = data.get("description")
        return value if isinstance(value, str) else ""
    return data if isinstance(data, str) else ""
