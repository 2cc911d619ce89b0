"""The fleet's keys: what ``fleet up`` makes, and the share each process gets (only its own role's key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.fleet.commands import process_specs
from orchestrator.fleet.keys import console_operator, ensure_keyring, fleet_identities, hand_out
from orchestrator.fleet.manifest import FleetManifest, parse_manifest
from protocol.keyring import Keyring, KeyringError


def manifest(ui: dict[str, Any] | None = None, workers: tuple[str, ...] = ("python", "llm")) -> FleetManifest:
    spec: dict[str, Any] = {"llm": {"serve": {"model": "m", "command": ["orchestrator", "sim-llm"], "gpus": 0}},
                            "workers": [{"capability": c, "replicas": 2} for c in workers]}
    if ui is not None:
        spec["ui"] = ui
    return parse_manifest({"apiVersion": "orchestrator.dev/v1", "kind": "Fleet", "metadata": {"name": "k"},
                           "spec": spec}, environ={})


def test_a_new_keyring_has_the_manager_every_capability_and_an_operator(tmp_path: Path) -> None:
    m = manifest(ui={})
    ring, added = ensure_keyring(m, tmp_path / "keys")
    assert sorted(added) == ["manager", "operator:admin", "worker:llm", "worker:python"]
    assert sorted(ring.private) == sorted(added)
    again, added_again = ensure_keyring(m, tmp_path / "keys")
    assert added_again == []  # the second fleet up keeps the keys it made
    assert again.public["manager"].current == ring.public["manager"].current


def test_a_capability_added_to_the_manifest_gets_a_key_and_nothing_else_changes(tmp_path: Path) -> None:
    ring, _ = ensure_keyring(manifest(), tmp_path / "keys")
    before = ring.public["worker:python"].current
    grown, added = ensure_keyring(manifest(workers=("python", "llm", "slugify")), tmp_path / "keys")
    assert added == ["worker:slugify"]
    assert grown.public["worker:python"].current == before


def test_a_key_whose_private_half_is_elsewhere_is_refused_not_replaced(tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "full")
    ring.add("worker", "python")
    ring.add("worker", "llm")
    ring.export(tmp_path / "public-only", ["manager"])  # has python's public key, not its private one
    with pytest.raises(KeyringError, match="public key of worker:python but not its private key"):
        ensure_keyring(manifest(), tmp_path / "public-only")


def test_each_share_holds_the_public_keyring_and_only_its_own_private_key(tmp_path: Path) -> None:
    m = manifest(ui={})
    ring, _ = ensure_keyring(m, tmp_path / "keys")
    shares = hand_out(m, ring, tmp_path / "shares")
    assert set(shares.by_identity) == {"manager", "worker:python", "worker:llm", "operator:admin"}
    for ident, path in shares.by_identity.items():
        share = Keyring.load(path)
        assert list(share.private) == [ident]
        assert set(share.public) == set(ring.public)  # it checks everyone
        for other in set(ring.public) - {ident}:
            with pytest.raises(KeyringError, match=f"no private key for {other}"):
                share.signing_key(other)
    assert Keyring.load(shares.public).private == {}


def test_a_dropped_capability_loses_its_share(tmp_path: Path) -> None:
    ring, _ = ensure_keyring(manifest(workers=("python", "llm", "slugify")), tmp_path / "keys")
    hand_out(manifest(workers=("python", "llm", "slugify")), ring, tmp_path / "shares")
    shares = hand_out(manifest(), ring, tmp_path / "shares")
    assert sorted(p.name for p in (tmp_path / "shares").iterdir()) == ["manager", "public", "worker-llm",
                                                                       "worker-python"]
    assert "worker:slugify" not in shares.by_identity


def test_each_process_gets_its_own_share_in_orch_keys(tmp_path: Path) -> None:
    m = manifest(ui={"port": 8081})
    ring, _ = ensure_keyring(m, tmp_path / "keys")
    shares = hand_out(m, ring, tmp_path / "shares")
    specs = {s.name: s for s in process_specs(m, environ={"ORCH_KEYS": "/the/full/keyring"}, keys=shares)}
    assert "ORCH_KEYS" not in specs["vllm"].env  # the model server is not on the bus
    assert specs["manager"].env["ORCH_KEYS"] == str(shares.by_identity["manager"])
    for i in range(2):
        assert specs[f"worker-python-{i}"].env["ORCH_KEYS"] == str(shares.by_identity["worker:python"])
        assert specs[f"worker-llm-{i}"].env["ORCH_KEYS"] == str(shares.by_identity["worker:llm"])
    assert specs["ui"].env["ORCH_KEYS"] == str(shares.by_identity["operator:admin"])
    assert specs["ui"].argv[-2:] == ("--operator", "admin")


def test_a_read_only_console_gets_the_public_keyring_and_no_operator(tmp_path: Path) -> None:
    m = manifest(ui={"readOnly": True})
    ring, _ = ensure_keyring(m, tmp_path / "keys")
    assert console_operator(m, ring) is None
    shares = hand_out(m, ring, tmp_path / "shares")
    ui = next(s for s in process_specs(m, environ={}, keys=shares) if s.name == "ui")
    assert ui.env["ORCH_KEYS"] == str(shares.public)
    assert "--operator" not in ui.argv


def test_the_console_operator_follows_the_manifest_then_the_keyring(tmp_path: Path) -> None:
    assert fleet_identities(manifest(ui={"operator": "console"}))[-1] == "operator:console"
    ring = Keyring.init(tmp_path / "keys", operator="alice")
    assert console_operator(manifest(ui={}), ring) == "operator:alice"  # the keyring's only operator
    ring.add("operator", "bob")
    assert console_operator(manifest(ui={}), ring) == "operator:admin"  # several: the default name
    assert console_operator(manifest(), ring) is None  # no console
