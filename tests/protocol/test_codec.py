"""Codec properties: every message round-trips, and decode never raises anything but ProtocolError."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any, get_args

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocol.authority import SENDER_ROLE, sole_reader
from protocol.codec import Codec
from protocol.envelope import PROTOCOL_VERSION, Envelope
from protocol.errors import (
    BadSignature,
    DecodeError,
    FrameTooLarge,
    ProtocolError,
    UnknownMessageType,
    UnsupportedVersion,
)
from protocol.history import (
    Dispatched,
    Guard,
    HistoryEvent,
    OverrideGiven,
    OverrideRefused,
    ProgressNoted,
    RunFinished,
    RunStarted,
    TaskOutline,
    Transitioned,
    VerdictGiven,
    Waiting,
    WaitingChanged,
    WaitingFor,
)
from protocol.keyring import Keyring
from protocol.messages import (
    Assign,
    Cancel,
    Done,
    Failed,
    Heartbeat,
    MessageType,
    Override,
    Progress,
    Redo,
    RunEvents,
    Submit,
    Verdict,
    VerifyRequest,
    VerifyResponse,
)
from protocol.states import RunState, TaskEvent, TaskState, VerifyStage

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PER_TYPE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Signed codecs: one keyring holding a key for each role, so any message type can be signed by its sender.
_RING = Keyring.init(Path(tempfile.mkdtemp(prefix="codec-keys-")), operator="o")
_RING.add("worker", "w")
SIGNED = Codec(keyring=_RING, signers=("manager", "operator:o", "worker:w"))
SIGNED_ALL = Codec(keyring=_RING, signers=SIGNED.signers, reply_macs=False)  # replies signed too, not MAC'd
SIGNER_OF = {kind: {"manager": "manager", "worker": "worker:w", "operator": "operator:o"}[role]
             for kind, role in SENDER_ROLE.items()}


def codec_of(signed: bool) -> Codec:
    return SIGNED if signed else Codec()


def encode(codec: Codec, envelope: Envelope) -> bytes:
    """Encode as the message type's sender would (signing, when the codec signs)."""
    return codec.encode(envelope, signer=SIGNER_OF[envelope.type] if codec.verifies else None)

# --- strategies -------------------------------------------------------------------------------------------------

MSGPACK_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOATS = st.floats(allow_nan=False)
TEXT = st.text(max_size=20)
STRS = st.lists(TEXT, max_size=3).map(tuple)

JSON = st.recursive(
    st.none() | st.booleans() | MSGPACK_INTS | FLOATS | TEXT,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
    max_leaves=12,
)
JSON_DICT = st.dictionaries(TEXT, JSON, max_size=4)

REDO = st.builds(Redo, plan=TEXT, context=TEXT, feedback=TEXT, corrections=STRS)
VERDICT = st.builds(Verdict, passed=st.booleans(), feedback=TEXT, corrections=STRS, verifier=TEXT)


NAMES = st.lists(TEXT, max_size=3).map(tuple)
HISTORY_BODIES = st.one_of(
    st.builds(RunStarted, goal=TEXT, tasks=st.lists(st.builds(TaskOutline, id=TEXT, capability=TEXT,
                                                                depends_on=NAMES), max_size=3).map(tuple)),
    st.builds(Dispatched, capability=TEXT),
    st.builds(Transitioned, event=st.sampled_from(TaskEvent), from_state=st.sampled_from(TaskState),
              to_state=st.sampled_from(TaskState), reason=TEXT, guard=st.none() | st.sampled_from(get_args(Guard)),
              output=JSON, tokens=MSGPACK_INTS, duration_s=FLOATS, error=TEXT,
              verdict=st.none() | st.builds(VerdictGiven, stage=st.sampled_from(VerifyStage), passed=st.booleans(),
                                            verifier=TEXT, feedback=TEXT)),
    st.builds(VerdictGiven, stage=st.sampled_from(VerifyStage), passed=st.booleans(), verifier=TEXT, feedback=TEXT,
              corrections=NAMES, tokens=MSGPACK_INTS),
    st.builds(OverrideGiven, action=TEXT, feedback=TEXT),
    st.builds(OverrideRefused, action=TEXT, reason=TEXT),
    st.builds(WaitingChanged, waiting=st.none() | st.builds(
        Waiting, for_=st.sampled_from(get_args(WaitingFor)), since=FLOATS, capability=TEXT, on=NAMES)),
    st.builds(ProgressNoted, message=TEXT, fraction=st.none() | st.floats(min_value=0.0, max_value=1.0)),
    st.builds(RunFinished, state=st.sampled_from(RunState), reason=TEXT),
)
BODIES: dict[str, st.SearchStrategy[Any]] = {
    "assign": st.builds(
        Assign,
        capability=TEXT,
        instruction=TEXT,
        input=JSON,
        config=JSON_DICT,
        spec_description=TEXT,
        timeout_s=st.none() | FLOATS,
        redo=st.lists(REDO, max_size=3).map(tuple),
        dependencies=JSON_DICT,
    ),
    "done": st.builds(Done, output=JSON, tokens=MSGPACK_INTS, duration_s=FLOATS, self_check=st.booleans()),
    "failed": st.builds(Failed, error=TEXT, error_type=TEXT, retryable=st.booleans()),
    "verify_request": st.builds(
        VerifyRequest, capability=TEXT, instruction=TEXT, input=JSON, output=JSON, spec_description=TEXT
    ),
    "verify_response": st.builds(VerifyResponse, verdict=VERDICT),
    "redo": REDO,
    "cancel": st.builds(Cancel, reason=TEXT, by=TEXT),
    "heartbeat": st.builds(Heartbeat, in_flight=MSGPACK_INTS),
    "submit": st.builds(Submit, job=JSON_DICT, source=TEXT),
    "override": st.builds(Override, action=st.sampled_from(["approve", "reject", "redo", "accept", "cancel"]),
                          feedback=TEXT, by=TEXT),
    "run_events": st.builds(RunEvents, events=st.lists(st.builds(
        HistoryEvent, seq=MSGPACK_INTS, run_id=TEXT, task_id=TEXT, attempt=MSGPACK_INTS, time=FLOATS, actor=TEXT,
        body=HISTORY_BODIES), max_size=3).map(tuple)),
    "progress": st.builds(Progress, message=TEXT, fraction=st.none() | st.floats(min_value=0.0, max_value=1.0)),
}


def envelopes(body: st.SearchStrategy[Any]) -> st.SearchStrategy[Envelope]:
    return st.builds(
        Envelope,
        msg_id=TEXT,
        run_id=TEXT,
        task_id=TEXT,
        attempt=st.integers(min_value=0, max_value=2**64 - 1),
        sender=TEXT,
        time=FLOATS,
        trace=st.dictionaries(TEXT, TEXT, max_size=3),
        body=body,
    )


ANY_ENVELOPE = envelopes(st.one_of(*BODIES.values()))

# Everything msgpack can carry, keys included (bytes keys survive strict_map_key; ints do not reach us).
WIRE = st.recursive(
    st.none() | st.booleans() | MSGPACK_INTS | FLOATS | TEXT | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT | st.binary(max_size=5), kids, max_size=4),
    max_leaves=15,
)
HASHABLE_WIRE = st.none() | st.booleans() | MSGPACK_INTS | FLOATS | TEXT | st.binary(max_size=20)
ENVELOPE_KEYS = st.sampled_from([*Envelope.model_fields, "extra"])


def _pack(data: Any) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def _raw(frame: bytes) -> dict[str, Any]:
    return msgpack.unpackb(frame, raw=False)


def test_every_message_type_has_a_strategy() -> None:
    assert set(BODIES) == set(get_args(MessageType))


# --- round trips ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BODIES))
@PER_TYPE
@given(data=st.data())
def test_every_message_type_round_trips(kind: str, data: st.DataObject) -> None:
    sent = data.draw(envelopes(BODIES[kind]))
    assert sent.type == kind
    got = Codec().decode(Codec().encode(sent))
    assert got == sent
    assert got.sig is None


@pytest.mark.parametrize("kind", sorted(BODIES))
@PER_TYPE
@given(data=st.data())
def test_every_message_type_round_trips_signed(kind: str, data: st.DataObject) -> None:
    sent = data.draw(envelopes(BODIES[kind]))
    for codec in (SIGNED, SIGNED_ALL):
        frame = encode(codec, sent)
        raw = _raw(frame)
        # A worker's reply has one reader, the manager: it carries a MAC for it, unless replies are signed.
        proof = "mac" if codec.reply_macs and sole_reader(kind) else "sig"
        assert set(raw) & {"sig", "mac"} == {proof}
        assert len(raw[proof]) == (32 if proof == "mac" else 64)
        for reader in (SIGNED, SIGNED_ALL):
            got = reader.decode(frame)
            # The signature or MAC is checked and stripped on the way in; the signer it proves stays.
            assert got == sent.model_copy(update={"signer": SIGNER_OF[kind]})
            assert got.sig is None


@PROPS
@given(sent=ANY_ENVELOPE)
def test_encode_ignores_a_sig_already_on_the_envelope(sent: Envelope) -> None:
    stale = sent.model_copy(update={"sig": b"stale"})
    assert "sig" not in _raw(Codec().encode(stale))
    assert SIGNED.decode(encode(SIGNED, stale)) == sent.model_copy(update={"signer": SIGNER_OF[sent.type]})


# --- decode never raises anything but ProtocolError --------------------------------------------------------------


def _decode_or_protocol_error(codec: Codec, frame: bytes) -> None:
    try:
        got = codec.decode(frame)
    except ProtocolError:
        return
    assert isinstance(got, Envelope)


@PROPS
@given(frame=st.binary(max_size=200), signed=st.booleans())
def test_random_bytes_raise_only_protocol_error(frame: bytes, signed: bool) -> None:
    _decode_or_protocol_error(codec_of(signed), frame)


def _with_extra_keys(head: dict[Any, Any], keys: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[Any, Any]]:
    return st.dictionaries(keys, WIRE, max_size=4).map(lambda rest: {**rest, **head})


# Header-shaped maps: ``v`` is usually right and ``body.type`` usually known, so validation is reached.
BODY_MAPS = st.fixed_dictionaries({}, optional={"type": st.sampled_from(sorted(BODIES)) | HASHABLE_WIRE}).flatmap(
    lambda head: _with_extra_keys(head, TEXT | st.binary(max_size=5))
)
HEADER_MAPS = st.fixed_dictionaries(
    {},
    optional={
        "v": st.just(PROTOCOL_VERSION) | WIRE,
        "body": BODY_MAPS | WIRE,
        "sig": st.binary(max_size=40) | WIRE,
    },
).flatmap(lambda head: _with_extra_keys(head, ENVELOPE_KEYS | TEXT | st.binary(max_size=5)))


@PROPS
@given(data=HEADER_MAPS, signed=st.booleans())
def test_random_maps_with_hashable_body_type_raise_only_protocol_error(data: dict[Any, Any], signed: bool) -> None:
    _decode_or_protocol_error(codec_of(signed), _pack(data))


@PROPS
@given(data=st.dictionaries(ENVELOPE_KEYS | TEXT | st.binary(max_size=5), WIRE, max_size=6), signed=st.booleans())
@example(data={"v": PROTOCOL_VERSION, "body": {"type": []}}, signed=False)
def test_random_maps_raise_only_protocol_error(data: dict[Any, Any], signed: bool) -> None:
    _decode_or_protocol_error(codec_of(signed), _pack(data))


@pytest.mark.parametrize("kind", [[], ["assign"], {}, {"type": "assign"}])
def test_unhashable_body_type_raises_unknown_message_type(kind: Any) -> None:
    with pytest.raises(UnknownMessageType):
        Codec().decode(_pack({"v": PROTOCOL_VERSION, "body": {"type": kind}}))


@PROPS
@given(sent=ANY_ENVELOPE, data=st.data(), signed=st.booleans())
def test_mutated_valid_frames_raise_only_protocol_error(sent: Envelope, data: st.DataObject, signed: bool) -> None:
    codec = codec_of(signed)
    raw = _raw(encode(codec, sent))
    target = raw if data.draw(st.booleans(), label="top level") else raw["body"]
    key = data.draw(st.sampled_from(sorted(target)) | TEXT, label="key")
    if data.draw(st.booleans(), label="delete"):
        target.pop(key, None)
    else:
        # An unhashable body.type has tests of its own above.
        target[key] = data.draw(HASHABLE_WIRE if target is raw["body"] and key == "type" else WIRE, label="value")
    _decode_or_protocol_error(codec, _pack(raw))


@PROPS
@given(sent=ANY_ENVELOPE, data=st.data())
def test_every_truncation_of_a_frame_is_a_decode_error(sent: Envelope, data: st.DataObject) -> None:
    frame = Codec().encode(sent)
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1), label="cut")
    with pytest.raises(DecodeError, match="not valid msgpack"):
        Codec().decode(frame[:cut])


# --- each error, with its message --------------------------------------------------------------------------------


def heartbeat(**fields: Any) -> Envelope:
    return Envelope(run_id="r", task_id="t1", attempt=1, body=Heartbeat(), **fields)


def test_unknown_protocol_version_is_named() -> None:
    frame = Codec().encode(heartbeat(v=PROTOCOL_VERSION + 41))
    with pytest.raises(UnsupportedVersion, match=rf"protocol version {PROTOCOL_VERSION + 41} is not supported"):
        Codec().decode(frame)


def test_missing_protocol_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedVersion, match="protocol version None"):
        Codec().decode(_pack({"body": {"type": "heartbeat"}}))


def test_unknown_message_type_is_named() -> None:
    with pytest.raises(UnknownMessageType, match="unknown message type 'teleport'"):
        Codec().decode(_pack({"v": PROTOCOL_VERSION, "body": {"type": "teleport"}}))


def test_missing_body_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="no body map"):
        Codec().decode(_pack({"v": PROTOCOL_VERSION}))


def test_frame_over_the_limit_on_encode() -> None:
    sent = Envelope(body=Assign(capability="echo", instruction="x" * 500))
    with pytest.raises(FrameTooLarge, match=r"'assign' message is \d+ bytes, over the limit of 128"):
        Codec(max_frame_bytes=128).encode(sent)


def test_frame_over_the_limit_on_decode() -> None:
    frame = Codec().encode(Envelope(body=Assign(capability="echo", instruction="x" * 500)))
    with pytest.raises(FrameTooLarge, match=rf"frame is {len(frame)} bytes, over the limit of 128"):
        Codec(max_frame_bytes=128).decode(frame)


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    sent = heartbeat()
    frame = Codec().encode(sent)
    assert Codec(max_frame_bytes=len(frame)).decode(frame) == sent
    assert Codec(max_frame_bytes=len(frame)).encode(sent) == frame
    with pytest.raises(FrameTooLarge):
        Codec(max_frame_bytes=len(frame) - 1).decode(frame)


def test_truncated_frame_is_a_decode_error() -> None:
    frame = Codec().encode(heartbeat())
    with pytest.raises(DecodeError, match="not valid msgpack"):
        Codec().decode(frame[:-1])


def test_trailing_bytes_are_a_decode_error() -> None:
    frame = Codec().encode(heartbeat())
    with pytest.raises(DecodeError, match="not valid msgpack"):
        Codec().decode(frame + b"\x00")


@pytest.mark.parametrize(("value", "name"), [([1, 2], "list"), ("hi", "str"), (7, "int"), (None, "NoneType")])
def test_non_map_frame_is_a_decode_error(value: Any, name: str) -> None:
    with pytest.raises(DecodeError, match=f"frame must hold a map, got {name}"):
        Codec().decode(_pack(value))


def test_non_bytes_frame_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="frame must be bytes, got str"):
        Codec().decode("not bytes")  # type: ignore[arg-type]


def test_bytearray_and_memoryview_frames_decode() -> None:
    sent = heartbeat()
    frame = Codec().encode(sent)
    assert Codec().decode(bytearray(frame)) == sent  # type: ignore[arg-type]
    assert Codec().decode(memoryview(frame)) == sent  # type: ignore[arg-type]


def test_unknown_envelope_field_is_named() -> None:
    raw = _raw(Codec().encode(heartbeat()))
    raw["colour"] = "red"
    with pytest.raises(DecodeError, match=r"invalid 'heartbeat' message: .*colour"):
        Codec().decode(_pack(raw))


def test_unknown_body_field_is_named() -> None:
    raw = _raw(Codec().encode(heartbeat()))
    raw["body"]["colour"] = "red"
    with pytest.raises(DecodeError, match=r"invalid 'heartbeat' message: .*colour"):
        Codec().decode(_pack(raw))


def test_invalid_field_value_is_named() -> None:
    raw = _raw(Codec().encode(Envelope(body=Progress(fraction=0.5))))
    raw["body"]["fraction"] = 2.0
    with pytest.raises(DecodeError, match=r"invalid 'progress' message: .*fraction"):
        Codec().decode(_pack(raw))


def test_missing_signature_is_a_bad_signature() -> None:
    frame = Codec().encode(heartbeat())
    with pytest.raises(BadSignature, match="not signed"):
        SIGNED.decode(frame)


@pytest.mark.parametrize("sig", ["text", 1, None, [b"x"]])
def test_non_bytes_signature_is_a_bad_signature(sig: Any) -> None:
    raw = _raw(encode(SIGNED_ALL, heartbeat()))
    raw["sig"] = sig
    with pytest.raises(BadSignature, match="not signed"):
        SIGNED.decode(_pack(raw))


@pytest.mark.parametrize(("reply_macs", "proof"), [(False, "signature"), (True, "MAC")])
def test_a_signature_or_mac_from_another_keyring_does_not_match(reply_macs: bool, proof: str) -> None:
    other = Keyring.init(Path(tempfile.mkdtemp(prefix="codec-other-")), operator="o")
    other.add("worker", "w")
    frame = Codec(keyring=other, signers=("worker:w",), reply_macs=reply_macs).encode(heartbeat())
    with pytest.raises(BadSignature, match=f"{proof} does not match 'worker:w'"):
        SIGNED.decode(frame)


@pytest.mark.parametrize(("sender", "proof"), [(SIGNED_ALL, "signature"), (SIGNED, "MAC")])
def test_tampered_signed_frame_is_a_bad_signature(sender: Codec, proof: str) -> None:
    raw = _raw(encode(sender, heartbeat()))
    raw["task_id"] = "t2"
    with pytest.raises(BadSignature, match=f"{proof} does not match 'worker:w'"):
        SIGNED.decode(_pack(raw))


def test_a_signer_swapped_for_another_is_a_bad_signature() -> None:
    # The signer's name is inside the signed part: relabelling a worker's frame as the manager's fails.
    raw = _raw(SIGNED.encode(Envelope(run_id="r", task_id="t", attempt=1, body=Assign(capability="w", instruction="i")),
                             signer="manager"))
    raw["signer"] = "worker:w"
    with pytest.raises(BadSignature):
        SIGNED.decode(_pack(raw))


@pytest.mark.parametrize(("body", "signer", "wanted"), [
    (Assign(capability="w", instruction="i"), "worker:w", "manager"),
    (Cancel(reason="stop"), "worker:w", "manager"),
    (Cancel(reason="stop"), "operator:o", "manager"),
    (Override(action="approve"), "worker:w", "operator"),
    (Override(action="approve"), "manager", "operator"),
    (Submit(job={}), "worker:w", "operator"),
    (Done(output=1), "operator:o", "worker"),
])
def test_a_role_that_may_not_send_a_message_is_refused_even_with_a_valid_signature(body: Any, signer: str,
                                                                                   wanted: str) -> None:
    frame = SIGNED.encode(Envelope(run_id="r", task_id="t", attempt=1, body=body), signer=signer)
    with pytest.raises(BadSignature, match=rf"must be signed by a key of role '{wanted}', not by '{signer}'"):
        SIGNED.decode(frame)


def test_a_worker_key_may_not_publish_on_another_capabilitys_stream() -> None:
    frame = SIGNED.encode(Envelope(run_id="r", task_id="t", attempt=1, body=Done(output=1)), signer="worker:w")
    assert SIGNED.decode(frame, stream="results.w").signer == "worker:w"
    with pytest.raises(BadSignature, match=r"'worker:w' may not publish on 'results\.other'"):
        SIGNED.decode(frame, stream="results.other")


def test_a_signer_missing_from_the_keyring_is_named() -> None:
    raw = _raw(encode(SIGNED, heartbeat()))
    raw["signer"] = "worker:ghost"
    with pytest.raises(BadSignature, match="'worker:ghost', which has no key in the keyring"):
        SIGNED.decode(_pack(raw))


def test_a_codec_refuses_to_sign_as_an_identity_it_does_not_hold() -> None:
    codec = Codec(keyring=_RING, signers=("worker:w",))
    with pytest.raises(BadSignature, match="no key to sign as 'manager'"):
        codec.encode(heartbeat(), signer="manager")


def test_signed_frame_decoded_without_a_key_is_accepted_unverified_and_keeps_its_sig() -> None:
    # A codec without a keyring does not check signatures at all (``--insecure``), and the raw
    # ``sig`` stays on the envelope. That holds for a forged signature too.
    sent = heartbeat()
    frame = encode(SIGNED_ALL, sent)
    got = Codec().decode(frame)
    assert not Codec().verifies
    assert got.sig == _raw(frame)["sig"]
    assert got.model_copy(update={"sig": None, "signer": ""}) == sent

    forged = _raw(frame)
    forged["sig"] = b"forged"
    assert Codec().decode(_pack(forged)).sig == b"forged"


def test_a_macd_frame_decoded_without_a_key_is_accepted_unverified() -> None:
    sent = heartbeat()
    frame = encode(SIGNED, sent)
    assert "mac" in _raw(frame)
    assert Codec().decode(frame).model_copy(update={"signer": ""}) == sent


# --- MACs on replies -----------------------------------------------------------------------------------------------


def _share(*identities: str) -> Keyring:
    """What one process of a fleet holds: every public key, and the private keys of its own roles."""
    return _RING.export(Path(tempfile.mkdtemp(prefix="codec-share-")), identities)


def done(**fields: Any) -> Envelope:
    return Envelope(run_id="r", task_id="t1", attempt=1, body=Done(output=1), **fields)


def test_a_reply_macd_by_a_worker_process_is_checked_by_the_manager_process() -> None:
    # Separate processes, separate key files: each side derives the same key from its own private key alone.
    worker = Codec(keyring=_share("worker:w"), signers=("worker:w",))
    manager = Codec(keyring=_share("manager"), signers=("manager",))
    frame = worker.encode(done(), signer="worker:w")
    assert len(_raw(frame)["mac"]) == 32
    assert manager.decode(frame, stream="results.w").signer == "worker:w"


def test_a_macd_reply_cannot_be_checked_without_the_readers_key() -> None:
    frame = SIGNED.encode(done(), signer="worker:w")
    onlooker = Codec(keyring=_share("worker:w"), signers=("worker:w",))  # even the sender cannot show it to others
    with pytest.raises(BadSignature, match="MAC for 'manager', and this process holds no key of 'manager'"):
        onlooker.decode(frame)


def test_a_compromised_worker_cannot_mac_as_another_worker() -> None:
    # It holds worker:w's key; a MAC it makes and labels worker:v is checked against worker:v's key.
    if "worker:v" not in _RING.public:
        _RING.add("worker", "v")
    compromised = Codec(keyring=_share("worker:w"), signers=("worker:w",))
    raw = _raw(compromised.encode(done(), signer="worker:w"))
    raw["signer"] = "worker:v"
    raw["mac"] = compromised.keyring.mac("worker:w", "manager", _pack({k: v for k, v in raw.items() if k != "mac"}))
    with pytest.raises(BadSignature, match="MAC does not match 'worker:v'"):
        SIGNED.decode(_pack(raw))


def test_macs_are_bound_to_their_direction() -> None:
    assert _RING.mac("worker:w", "manager", b"x") != _RING.mac("manager", "worker:w", b"x")
    assert _RING.mac("worker:w", "manager", b"x") != _RING.mac("operator:o", "manager", b"x")


def test_a_message_with_several_readers_may_not_carry_a_mac() -> None:
    # An assign is read by every worker of its capability: a key shared with them would let one pose as the manager.
    sent = Envelope(run_id="r", task_id="t1", attempt=1, body=Assign(capability="w", instruction="i"))
    raw = _raw(SIGNED.encode(sent, signer="manager"))
    assert "sig" in raw
    del raw["sig"]
    raw["mac"] = _RING.mac("manager", "worker:w", _pack(raw))
    with pytest.raises(BadSignature, match="'assign' messages must be signed"):
        SIGNED.decode(_pack(raw))


def test_a_frame_with_both_a_signature_and_a_mac_is_refused() -> None:
    raw = _raw(SIGNED.encode(done(), signer="worker:w"))
    raw["sig"] = _raw(SIGNED_ALL.encode(done(), signer="worker:w"))["sig"]
    with pytest.raises(BadSignature, match="both a signature and a MAC"):
        SIGNED.decode(_pack(raw))


@pytest.mark.parametrize("mac", [b"", b"x" * 31, b"x" * 64, "text", 5])
def test_a_malformed_mac_is_refused(mac: Any) -> None:
    raw = _raw(SIGNED.encode(done(), signer="worker:w"))
    raw["mac"] = mac
    with pytest.raises(BadSignature, match=r"not signed|MAC does not match"):
        SIGNED.decode(_pack(raw))


def test_a_mac_made_before_the_senders_rotation_checks_until_retired() -> None:
    root = Path(tempfile.mkdtemp(prefix="codec-rotate-"))
    ring = Keyring.init(root, operator="o")
    ring.add("worker", "w")
    codec = Codec(keyring=ring, signers=("manager", "worker:w"))
    before = codec.encode(done(), signer="worker:w")
    ring.add("worker", "w", rotate=True)
    after = codec.encode(done(), signer="worker:w")
    assert _raw(before)["mac"] != _raw(after)["mac"]
    for frame in (before, after):
        assert codec.decode(frame).signer == "worker:w"
    ring.retire("worker:w")
    assert codec.decode(after).signer == "worker:w"
    with pytest.raises(BadSignature, match="MAC does not match 'worker:w'"):
        codec.decode(before)


def test_a_mac_for_the_managers_old_key_does_not_check_after_the_manager_rotated() -> None:
    # The manager keeps no old private key: a worker still on the old keyring.json is refused (docs/security.md).
    root = Path(tempfile.mkdtemp(prefix="codec-rotate-manager-"))
    ring = Keyring.init(root, operator="o")
    ring.add("worker", "w")
    stale_worker = Codec(keyring=ring.export(root / "worker", ["worker:w"]), signers=("worker:w",))
    ring.add("manager", rotate=True)
    with pytest.raises(BadSignature, match="MAC does not match 'worker:w'"):
        Codec(keyring=ring, signers=("manager",)).decode(stale_worker.encode(done()))


@pytest.mark.parametrize(
    "body",
    [
        Done(output={1, 2}),
        Done(output=object()),
        Done(output=2**64),
        Assign(capability="c", instruction="i", input=frozenset()),
        Assign(capability="c", instruction="i", config={"k": object()}),
        VerifyRequest(capability="c", instruction="i", output=-(2**63) - 1),
    ],
    ids=["done-set", "done-object", "done-bigint", "assign-frozenset", "assign-config-object", "verify-bigint"],
)
@pytest.mark.parametrize("signed", [False, True], ids=["plain", "signed"])
def test_unencodable_output_raises_protocol_error_naming_the_type(body: Any, signed: bool) -> None:
    with pytest.raises(ProtocolError, match=rf"cannot encode '{body.type}' message") as info:
        encode(codec_of(signed), Envelope(body=body))
    assert isinstance(info.value.__cause__, TypeError | ValueError | OverflowError)


@pytest.mark.parametrize("entries", [0, 1, 9, 14, 15, 20])
def test_a_proof_appended_to_the_packed_payload_is_what_packing_the_whole_frame_gives(entries: int) -> None:
    from protocol.codec import _with_last_entry

    data: dict[str, Any] = {f"k{i}": [i, "x" * i, b"\x00" * i] for i in range(entries)}
    payload = msgpack.packb(data, use_bin_type=True)
    tag = bytes(range(64))
    appended = _with_last_entry(payload, "sig", tag)
    if entries >= 15:  # a map16 header: packed whole by the caller instead
        assert appended is None
        return
    assert appended == msgpack.packb({**data, "sig": tag}, use_bin_type=True)


# --- one signature for a batch ------------------------------------------------------------------------------------


def assign(task_id: str, **fields: Any) -> Envelope:
    return Envelope(run_id="r", task_id=task_id, attempt=1, body=Assign(capability="w", instruction=f"do {task_id}"),
                    **fields)


def _batch(n: int, codec: Codec = SIGNED) -> tuple[list[Envelope], list[bytes]]:
    sent = [assign(f"t{i}") for i in range(n)]
    return sent, codec.encode_many([(envelope, "manager") for envelope in sent])


@pytest.mark.parametrize("n", [2, 3, 17, 256])
def test_a_batch_is_signed_once_and_each_message_checks_alone(n: int) -> None:
    sent, frames = _batch(n)
    raws = [_raw(frame) for frame in frames]
    assert all("sig" not in raw and "mac" not in raw for raw in raws)
    assert len({raw["bsig"][0] for raw in raws}) == 1  # one signature
    assert [raw["bsig"][1:3] for raw in raws] == [[i, n] for i in range(n)]
    # A worker process holds only its own key and the public ones; it sees one message of the batch, any of them.
    for i in (0, n // 2, n - 1):
        worker = Codec(keyring=_share("worker:w"), signers=("worker:w",))
        got = worker.decode(frames[i], stream="tasks.w")
        assert got.model_copy(update={"signer": ""}) == sent[i]
        assert got.signer == "manager"


def test_a_batch_over_the_limit_gets_a_signature_per_256_messages() -> None:
    _, frames = _batch(300)
    signatures = [_raw(frame)["bsig"][0] for frame in frames]
    assert len(set(signatures[:256])) == 1
    assert len(set(signatures[256:])) == 1
    assert signatures[0] != signatures[-1]
    assert all(SIGNED.decode(frame).task_id == f"t{i}" for i, frame in enumerate(frames))


def test_a_mixed_batch_macs_replies_and_signs_a_lone_message_alone() -> None:
    items: list[tuple[Envelope, str | None]] = [(assign("a"), "manager"), (done(), "worker:w"),
                                                (heartbeat(), "worker:w"), (assign("b"), "manager"),
                                                (Envelope(body=Submit(job={})), "operator:o")]
    frames = SIGNED.encode_many(items)
    proofs = [next(k for k in ("sig", "mac", "bsig") if k in _raw(frame)) for frame in frames]
    assert proofs == ["bsig", "mac", "mac", "bsig", "sig"]
    assert [SIGNED.decode(frame).signer for frame in frames] == ["manager", "worker:w", "worker:w", "manager",
                                                                  "operator:o"]


def test_encode_many_of_one_message_or_unsigned_is_encode() -> None:
    [frame] = SIGNED.encode_many([(assign("a"), "manager")])
    assert "sig" in _raw(frame)
    sent = [assign("a"), assign("b")]
    assert Codec().encode_many([(e, None) for e in sent]) == [Codec().encode(e) for e in sent]


def test_encode_many_refuses_what_encode_refuses() -> None:
    with pytest.raises(BadSignature, match="no key to sign as 'worker:other'"):
        SIGNED.encode_many([(assign("a"), "manager"), (done(), "worker:other")])
    small = Codec(keyring=_RING, signers=("manager",), max_frame_bytes=600)
    big = Envelope(run_id="r", task_id="t", attempt=1, body=Assign(capability="w", instruction="x" * 800))
    with pytest.raises(FrameTooLarge):
        small.encode_many([(assign("a"), "manager"), (big, "manager")])


@pytest.mark.parametrize("codec", [Codec(max_frame_bytes=600),
                                   Codec(keyring=_RING, signers=("manager",), max_frame_bytes=600)],
                         ids=["unsigned", "signed"])
@pytest.mark.parametrize("others", [0, 1, 5])
def test_a_message_too_big_to_encode_leaves_no_reference_cycle_behind(codec: Codec, others: int) -> None:
    # A refusal that kept its traceback (and the frames it holds) in a cycle lived until a full collection: the
    # history mirror of a 100,000-task run's start held ~65 MB of encoded frames that way, for the whole run.
    big = Envelope(run_id="r", task_id="t", attempt=1, body=Assign(capability="w", instruction="x" * 800))
    items = [(assign(f"a{i}"), "manager") for i in range(others)] + [(big, "manager")]
    gc.collect()
    gc.disable()
    try:
        try:
            codec.encode_many(items)
        except FrameTooLarge:
            pass
        else:
            pytest.fail("the big message was encoded")
        [error] = [e for e in codec.encode_each(items) if isinstance(e, FrameTooLarge)]
        del error
        assert gc.collect() == 0  # nothing left that only the cyclic collector could free
    finally:
        gc.enable()


def test_a_changed_message_of_a_batch_is_refused() -> None:
    _, frames = _batch(5)
    raw = _raw(frames[2])
    raw["body"]["instruction"] = "rm -rf /"
    with pytest.raises(BadSignature, match="signature does not match 'manager'"):
        SIGNED.decode(_pack(raw))


@pytest.mark.parametrize("change", ["swap proofs", "index", "size", "sibling", "signature", "signer"])
def test_a_batch_proof_moved_or_altered_is_refused(change: str) -> None:
    _, frames = _batch(6)
    raw, other = _raw(frames[1]), _raw(frames[4])
    if change == "swap proofs":
        raw["bsig"] = other["bsig"]
    elif change == "index":
        raw["bsig"][1] = 4
    elif change == "size":
        raw["bsig"][2] = 7
    elif change == "sibling":
        raw["bsig"][3][0] = bytes(32)
    elif change == "signature":
        raw["bsig"][0] = _raw(_batch(6)[1][1])["bsig"][0]  # another batch's signature
    else:
        raw["signer"] = "operator:o"
    with pytest.raises(BadSignature, match=r"does not match|does not fit|must be signed by a key of role"):
        SIGNED.decode(_pack(raw))


@pytest.mark.parametrize("bsig", [
    b"x", [], [b"s" * 64, 0, 2], [b"s" * 64, 0, 2, [], 1], ["text", 0, 2, []], [b"s" * 64, True, 2, [bytes(32)]],
    [b"s" * 64, "0", 2, [bytes(32)]], [b"s" * 64, 0, 2.0, [bytes(32)]], [b"s" * 64, 0, 2, [bytes(31)]],
    [b"s" * 64, 0, 2, bytes(32)], [b"s" * 64, 0, 2, ["x" * 32]], [b"s" * 64, -1, 2, [bytes(32)]],
    [b"s" * 64, 2, 2, [bytes(32)]], [b"s" * 64, 0, 2**40, [bytes(32)]], [b"s" * 64, 0, 2, [bytes(32)] * 40],
    [b"s" * 64, 0, 2, []],
])
def test_a_malformed_batch_proof_is_refused_by_name(bsig: Any) -> None:
    raw = _raw(_batch(2)[1][0])
    raw["bsig"] = bsig
    with pytest.raises(BadSignature, match="batch proof"):
        SIGNED.decode(_pack(raw))


def test_a_batch_proof_beside_a_signature_is_refused() -> None:
    raw = _raw(_batch(2)[1][0])
    raw["sig"] = _raw(SIGNED.encode(assign("t0"), signer="manager"))["sig"]
    with pytest.raises(BadSignature, match="more than one proof: bsig and sig"):
        SIGNED.decode(_pack(raw))


def test_a_workers_key_cannot_sign_a_batch_of_assigns() -> None:
    compromised = Codec(keyring=_share("worker:w"), signers=("worker:w",))
    frames = compromised.encode_many([(assign("a"), "worker:w"), (assign("b"), "worker:w")])
    assert "bsig" in _raw(frames[0])
    with pytest.raises(BadSignature, match="must be signed by a key of role 'manager', not by 'worker:w'"):
        SIGNED.decode(frames[0], stream="tasks.w")


def test_a_batch_signature_is_verified_once_until_the_keys_change(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = _share("worker:w")
    worker = Codec(keyring=ring, signers=("worker:w",))
    _, frames = _batch(8)
    checked: list[bytes] = []
    real_verify = ring.verify
    monkeypatch.setattr(ring, "verify", lambda ident, sig, payload: checked.append(payload) or real_verify(
        ident, sig, payload))
    for frame in frames:
        worker.decode(frame)
    assert len(checked) == 1  # the other seven cost a lookup
    ring.reload_if_changed()  # nothing changed: still remembered
    worker.decode(frames[0])
    assert len(checked) == 1
    ring.remove("manager")  # a key change forgets every signature checked with the old keys
    with pytest.raises(BadSignature, match="'manager', which has no key in the keyring"):
        worker.decode(frames[1])


def test_a_batch_message_decoded_without_a_key_is_accepted_unverified() -> None:
    sent, frames = _batch(3)
    assert Codec().decode(frames[1]).model_copy(update={"signer": ""}) == sent[1]


def test_the_batch_layout_in_the_docs_is_what_the_codec_makes_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    # tests/security/attacker.py builds batches from docs/security.md's words alone, with a copy of the key.
    from tests.security import attacker as atk

    monkeypatch.setenv("ORCH_KEYS", str(_RING.path))
    atk._private_key.cache_clear()
    try:
        sent, ours = _batch(5)
        theirs = [atk.pack(d) for d in atk.batch_sign([_raw(SIGNED.encode(e, signer="manager")) for e in sent],
                                                      "manager")]
    finally:
        atk._private_key.cache_clear()
    assert theirs == ours  # Ed25519 is deterministic: the same bytes, signature included
    assert [SIGNED.decode(frame).task_id for frame in theirs] == [e.task_id for e in sent]


# --- which bytes a proof is checked over -----------------------------------------------------------------------------


@pytest.mark.parametrize("proof", ["sig", "mac", "bsig"])
def test_a_proof_placed_first_is_checked_over_the_entries_packed_again(proof: str) -> None:
    # A proof covers the msgpack of the other entries as the reader packs them again, wherever the proof sits.
    frame = _batch(2)[1][0] if proof == "bsig" else SIGNED.encode(done(), signer="worker:w") if proof == "mac" \
        else SIGNED.encode(assign("a"), signer="manager")
    raw = _raw(frame)
    moved = {proof: raw.pop(proof), **raw}
    assert SIGNED.decode(_pack(moved)) == SIGNED.decode(frame)


def test_an_entry_slipped_in_before_the_proof_is_refused() -> None:
    raw = _raw(SIGNED.encode(assign("a"), signer="manager"))
    sig = raw.pop("sig")
    raw["priority"] = 1  # the map now counts one entry more than the signed one
    with pytest.raises(BadSignature, match="signature does not match 'manager'"):
        SIGNED.decode(_pack({**raw, "sig": sig}))
