"""How a process's trust settings reach its codec: replies carry a MAC unless ORCH_SIGN_REPLIES asks for signatures."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from orchestrator.trust import load_trust
from protocol.envelope import Envelope
from protocol.keyring import Keyring
from protocol.messages import Done


def _reply_proof(keys: Path) -> set[str]:
    codec = load_trust(keys, ["worker:w"], insecure=False, what="a worker for 'w'").codec()
    frame = codec.encode(Envelope(run_id="r", task_id="t", attempt=1, body=Done(output=1)), signer="worker:w")
    return set(msgpack.unpackb(frame, raw=False)) & {"sig", "mac"}


@pytest.mark.parametrize(("value", "proof"), [(None, "mac"), ("0", "mac"), ("1", "sig"), ("true", "sig")])
def test_orch_sign_replies_chooses_between_a_mac_and_a_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  value: str | None, proof: str) -> None:
    Keyring.init(tmp_path).add("worker", "w")
    if value is None:
        monkeypatch.delenv("ORCH_SIGN_REPLIES", raising=False)
    else:
        monkeypatch.setenv("ORCH_SIGN_REPLIES", value)
    assert _reply_proof(tmp_path) == {proof}
