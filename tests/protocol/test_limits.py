"""Shape limits on hostile data: checked without recursion, with errors that name the limit."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from protocol.codec import Codec
from protocol.envelope import Envelope
from protocol.errors import DecodeError
from protocol.limits import FRAME_LIMITS, JOB_LIMITS, OUTPUT_LIMITS, LimitExceeded, ShapeLimits, check_shape
from protocol.messages import Done


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_depth_up_to_the_limit_passes_and_one_more_fails() -> None:
    limits = ShapeLimits(max_depth=5, max_items=100)
    check_shape(nested(5), limits)
    with pytest.raises(LimitExceeded, match="nests deeper than 5 levels"):
        check_shape(nested(6), limits)
    with pytest.raises(LimitExceeded, match="limit max_depth"):
        check_shape({"a": {"b": nested(4)}}, limits, what="the output")


def test_far_deeper_than_the_recursion_limit_is_refused_not_crashed() -> None:
    with pytest.raises(LimitExceeded):
        check_shape(nested(100_000), FRAME_LIMITS)


def test_too_many_values_fail_naming_the_limit() -> None:
    check_shape(list(range(99)), ShapeLimits(max_depth=5, max_items=100))
    with pytest.raises(LimitExceeded, match="the output holds more than 100 values"):
        check_shape({"k": list(range(100))}, ShapeLimits(max_depth=5, max_items=100), what="the output")


@pytest.mark.parametrize("value", [b"\xff", {"a": [b"x"]}, msgpack.ExtType(1, b"x"), {1: "a"}])
def test_outputs_must_be_json_data(value: Any) -> None:
    with pytest.raises(LimitExceeded, match="JSON data"):
        check_shape(value, OUTPUT_LIMITS, what="the output")
    check_shape(value, FRAME_LIMITS)  # frames may hold bytes (signatures)


def test_the_codec_dead_letters_frames_deeper_than_the_frame_limit() -> None:
    codec = Codec()
    fine = codec.encode(Envelope(run_id="r", task_id="t", attempt=1, body=Done(output=nested(300))))
    assert codec.decode(fine).body == Done(output=nested(300))  # the manager fails the attempt, see test_manager
    data = msgpack.unpackb(fine)
    data["body"]["output"] = nested(600)
    with pytest.raises(DecodeError, match="frame nests deeper than 512 levels"):
        codec.decode(msgpack.packb(data))


def test_a_frame_no_larger_than_the_depth_limit_is_settled_by_its_size() -> None:
    # Every container takes a byte: 100 bytes cannot nest 101 levels. Output checks always walk.
    tight = ShapeLimits(max_depth=100, max_items=1000)
    check_shape(nested(101), tight, size=100)
    with pytest.raises(LimitExceeded):
        check_shape(nested(101), tight, size=101)
    with pytest.raises(LimitExceeded, match="JSON data"):
        check_shape([b"x"], ShapeLimits(max_depth=100, max_items=1000, json_only=True), size=3)


def test_subclasses_and_mixed_levels_are_walked_exactly() -> None:
    class Mapping(dict[str, Any]):
        pass

    limits = ShapeLimits(max_depth=3, max_items=100)
    check_shape([1, "a", Mapping(k=[1])], limits)
    with pytest.raises(LimitExceeded, match="deeper than 3"):
        check_shape([1, "a", Mapping(k=[[1]])], limits)
    with pytest.raises(LimitExceeded, match="deeper than 3"):
        check_shape({"a": 1, "b": (2, {"c": [3]})}, limits)


def test_check_shape_says_how_many_values_it_counted() -> None:
    # What a reader of a job in parts adds up against the whole job's limit.
    assert check_shape([1, [2, 3]], JOB_LIMITS) == 5
    assert check_shape({"a": {"b": None}}, JOB_LIMITS) == 3
    assert check_shape("leaf", JOB_LIMITS) == 1
