"""Ids: UUIDv7's layout (time first, then 80 random bits), so the ledger's keys arrive in order."""

from __future__ import annotations

import re
import time

from protocol.envelope import new_id


def test_an_id_is_32_hex_digits_that_start_with_the_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    made = new_id()
    after = time.time_ns() // 1_000_000
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert before <= int(made[:12], 16) <= after


def test_ids_made_later_sort_later_and_ids_of_one_moment_differ_in_their_tail() -> None:
    first = [new_id() for _ in range(10_000)]
    time.sleep(0.002)
    later = new_id()
    assert len(set(first)) == len(first)
    assert all(made < later for made in first)
    assert len({made[-8:] for made in first}) > 9_990  # the tail tells ids apart (a worker's name is made from it)
