"""ReadDeadlines: one timer per connection, and a wait past the timeout closes the connection."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import pytest

from protocol._read_deadlines import ReadDeadlines

pytestmark = pytest.mark.timeout(10)


@dataclass
class FakeTransport:
    aborted: int = 0

    def abort(self) -> None:
        self.aborted += 1


@dataclass
class FakeWriter:
    transport: FakeTransport = field(default_factory=FakeTransport)


@dataclass(eq=False)
class FakeConnection:
    _writer: FakeWriter = field(default_factory=FakeWriter)


async def test_replies_that_keep_coming_set_one_timer_and_close_nothing() -> None:
    deadlines, conn = ReadDeadlines(), FakeConnection()
    for _ in range(30):  # a reply every 10 ms for 0.3 s, against a timeout of 0.1 s
        deadlines.waiting(conn, 0.1)
        assert len(deadlines._timers) == 1
        await anyio.sleep(0.01)
        assert deadlines.done(conn) is False
    assert conn._writer.transport.aborted == 0
    deadlines.forget(conn)
    assert deadlines._timers == {}


async def test_a_wait_past_the_timeout_closes_the_connection_and_says_so() -> None:
    deadlines, conn = ReadDeadlines(), FakeConnection()
    deadlines.waiting(conn, 0.05)
    await anyio.sleep(0.02)
    deadlines.waiting(conn, 0.05)  # the next reply of the same read: its own 0.05 s
    await anyio.sleep(0.04)
    assert conn._writer.transport.aborted == 0  # 0.06 s in all, but each wait under 0.05 s
    await anyio.sleep(0.05)
    assert conn._writer.transport.aborted == 1
    assert deadlines.done(conn) is True
    deadlines.waiting(conn, 0.05)  # the connection is used again (reconnected): timed afresh
    assert deadlines.done(conn) is False
    deadlines.forget(conn)
