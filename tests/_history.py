"""Reading typed history in tests: the events of one kind, with their bodies."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from protocol.history import HistoryEvent, Transitioned, VerdictGiven
from protocol.states import TaskEvent

B = TypeVar("B")


def of(events: Iterable[HistoryEvent], kind: type[B]) -> list[tuple[HistoryEvent, B]]:
    """(event, body) for every event whose body is a ``kind``."""
    return [(e, e.body) for e in events if isinstance(e.body, kind)]


def transitions(events: Iterable[HistoryEvent], event: TaskEvent | str | None = None) -> list[HistoryEvent]:
    """The transition events (only ``event`` ones when given)."""
    return [e for e in events if isinstance(e.body, Transitioned) and (event is None or e.body.event == event)]


def verdicts(events: Iterable[HistoryEvent], *, passed: bool | None = None) -> list[VerdictGiven]:
    """The verdicts given, oldest first (only passes or only rejections when ``passed`` is given)."""
    given = [v for e in events if (v := e.verdict) is not None]
    return [v for v in given if passed is None or v.passed == passed]
