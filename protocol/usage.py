"""Token accounting per task and per run, filled in by ``InferenceClient``."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

__all__ = ("Usage", "UsageLedger")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens spent by one or more completions."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
            self.requests + other.requests,
        )

    @classmethod
    def from_openai(cls, usage: dict[str, object] | None) -> Usage:
        """Read an OpenAI/vLLM ``usage`` object (``prompt_tokens_details`` may be null)."""
        if not usage:
            return cls(requests=1)
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
        return cls(_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), _int(cached), 1)


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


class UsageLedger:
    """Usage keyed by (run_id, task_id); pass it to the client or read the client's own."""

    def __init__(self) -> None:
        self._by_task: defaultdict[tuple[str | None, str | None], Usage] = defaultdict(Usage)
        self._total = Usage()

    def record(self, usage: Usage, *, run_id: str | None = None, task_id: str | None = None) -> None:
        """Add ``usage`` to the task's, the run's and the total figures."""
        self._by_task[(run_id, task_id)] += usage
        self._total += usage

    def task(self, run_id: str | None, task_id: str | None) -> Usage:
        """Usage of one task of one run."""
        return self._by_task.get((run_id, task_id), Usage())

    def run(self, run_id: str | None) -> Usage:
        """Usage of every task of one run, summed."""
        total = Usage()
        for (rid, _), usage in self._by_task.items():
            if rid == run_id:
                total += usage
        return total

    def tasks(self, run_id: str | None) -> dict[str | None, Usage]:
        """Usage of each task of one run."""
        return {tid: u for (rid, tid), u in self._by_task.items() if rid == run_id}

    @property
    def total(self) -> Usage:
        """Usage of everything recorded."""
        return self._total
