"""Riding out an outage (``protocol.outage``): the backoff caps, one log line a minute, the optional limit.

Driven by a fake clock and a fixed jitter: no sleeps and no wall-clock bounds.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from protocol.errors import BusUnavailable
from protocol.outage import Backoff, Outage

URL = "redis://:***@127.0.0.1:6390/0"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.usefixtures("debug_logs")
def test_backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() -> None:
    top = Backoff(0.05, 2.0, rng=lambda: 1.0)  # the largest jitter factor (1.0)
    assert [round(top.next(), 3) for _ in range(9)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    bottom = Backoff(0.05, 2.0, rng=lambda: 0.0)  # the smallest (0.5)
    assert [round(bottom.next(), 3) for _ in range(8)] == [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert Backoff(5.0, 2.0, rng=lambda: 1.0).next() == 2.0  # a base above the cap is capped too


def _ride(outage: Outage, clock: Clock, seconds: float, *, op: str = "consume") -> list[float]:
    """Fail attempts back to back for ``seconds`` of fake time, sleeping what ``failed`` says; the delays."""
    backoff = Backoff(0.05, 2.0, rng=lambda: 1.0)
    delays = []
    end = clock.now + seconds
    while clock.now < end:
        delay = outage.failed(op, ConnectionError("Error 111 connecting"), started=clock.now, backoff=backoff)
        delays.append(delay)
        clock.now += delay
    return delays


@pytest.mark.usefixtures("debug_logs")
def test_a_long_outage_is_logged_once_a_minute_naming_redis_and_how_long() -> None:
    clock = Clock()
    outage = Outage(URL, clock=clock)
    with capture_logs() as logs:
        delays = _ride(outage, clock, 200.0)  # 3 min 20 s without Redis
        outage.recovered()
        outage.recovered()  # a second success logs nothing more
    assert max(delays) == 2.0  # capped: ~100 attempts, not a handful of ever longer waits
    assert len(delays) > 90
    events = [(e["event"], e.get("for_s"), e.get("outage_s")) for e in logs]
    assert [e[0] for e in events] == ["redis_unreachable", "redis_still_unreachable", "redis_still_unreachable",
                                      "redis_still_unreachable", "redis_reachable_again"]
    minutes = [e[1] for e in events[1:4]]
    assert all(60 * (i + 1) <= m < 60 * (i + 1) + 2.5 for i, m in enumerate(minutes)), minutes
    assert 200.0 <= events[-1][2] < 202.5
    assert all(e["url"] == URL for e in logs)
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["op"] == "consume"
    assert "Error 111" in logs[0]["error"]
    assert logs[0]["limit_s"] is None


@pytest.mark.usefixtures("debug_logs")
def test_many_calls_waiting_share_one_log_line_a_minute() -> None:
    clock = Clock()
    outage = Outage(URL, clock=clock)
    backoffs = [Backoff(0.05, 2.0, rng=lambda: 1.0) for _ in range(5)]
    with capture_logs() as logs:
        for _ in range(70):  # five calls failing every second for 70 s
            for i, backoff in enumerate(backoffs):
                outage.failed(f"op{i}", OSError("refused"), started=clock.now, backoff=backoff)
            clock.now += 1.0
    assert [e["event"] for e in logs] == ["redis_unreachable", "redis_still_unreachable"]


@pytest.mark.usefixtures("debug_logs")
def test_an_attempt_begun_before_redis_answered_again_does_not_open_a_new_outage() -> None:
    clock = Clock()
    outage = Outage(URL, clock=clock)
    backoff = Backoff(0.05, 2.0, rng=lambda: 1.0)
    with capture_logs() as logs:
        outage.failed("write", OSError("refused"), started=clock.now, backoff=backoff)
        begun = clock.now + 1.0
        clock.now += 3.0
        outage.recovered()
        outage.failed("consume", OSError("reset"), started=begun, backoff=backoff)  # stale
        assert outage.since is None
        clock.now += 1.0
        outage.failed("consume", OSError("reset"), started=clock.now, backoff=backoff)  # a new outage
    assert [e["event"] for e in logs] == ["redis_unreachable", "redis_reachable_again", "redis_unreachable"]


@pytest.mark.usefixtures("debug_logs")
def test_with_a_limit_the_outage_ends_in_bus_unavailable_and_waits_never_overshoot_it() -> None:
    clock = Clock()
    outage = Outage(URL, limit_s=10.0, clock=clock)
    with capture_logs() as logs, pytest.raises(BusUnavailable) as info:
        _ride(outage, clock, 60.0, op="consume")
    assert clock.now - 1000.0 == pytest.approx(10.0)  # the last wait ended exactly at the limit
    text = str(info.value)
    assert URL in text
    assert "unreachable for 10.0s" in text
    assert "limit of 10s" in text
    assert "Error 111" in text
    assert logs[-1]["event"] == "redis_outage_limit_reached"
    assert logs[-1]["log_level"] == "error"
    # the limit counts one continuous outage: a success in between starts the count again
    clock.now += 100.0
    outage.recovered()
    backoff = Backoff(0.05, 2.0, rng=lambda: 1.0)
    assert outage.failed("consume", OSError("x"), started=clock.now, backoff=backoff) == 0.05
