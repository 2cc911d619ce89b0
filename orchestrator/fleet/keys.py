"""The fleet's keys: which identity each process signs as, and the share of the keyring each one gets.

``fleet up`` makes (or completes) the keyring in ``.orchestrator/keys`` (the CLI's default
``ORCH_KEYS``, so ``orchestrator submit`` and ``approve`` in the same directory find it): the
manager's key, one ``worker:<capability>`` key per capability of the manifest, and an operator
key. Each process then gets a directory of its own role (``Keyring.export``): the public keyring
and only that role's private key, so a worker holds nothing that could sign for the manager,
another capability or an operator. ``fleet render`` puts the same shares into one Kubernetes
Secret (or set of compose secrets) per role.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator.fleet.manifest import FleetManifest
from protocol.keyring import Keyring, KeyringError, identity, role_of

__all__ = ("DEFAULT_OPERATOR", "PUBLIC_SHARE", "KeyShares", "console_operator", "ensure_keyring", "fleet_identities",
           "hand_out", "share_name")

DEFAULT_OPERATOR = "admin"  # the operator `orchestrator keys init` makes
PUBLIC_SHARE = "public"  # the public keyring alone: a read-only console checks signatures, signs nothing


@dataclass(frozen=True, slots=True)
class KeyShares:
    """The directories handed out: one per identity, the public one, and the console's operator (if any)."""

    by_identity: Mapping[str, Path]
    public: Path
    console: str | None

    def for_process(self, role: str, capability: str = "") -> Path | None:
        """The ``ORCH_KEYS`` of a process: its role's share; the public share for a read-only console; None for
        the LLM server, which is not on the bus."""
        if role == "manager":
            return self.by_identity["manager"]
        if role == "worker":
            return self.by_identity[identity("worker", capability)]
        if role == "ui":
            return self.by_identity[self.console] if self.console else self.public
        return None


def console_operator(manifest: FleetManifest, ring: Keyring | None = None) -> str | None:
    """The operator identity the console acts as: ``spec.ui.operator``, else the keyring's only operator
    key, else ``operator:admin``; None without a console or with a read-only one."""
    ui = manifest.ui
    if ui is None or ui.read_only:
        return None
    if ui.operator:
        return identity("operator", ui.operator)
    held = ring.operators() if ring is not None else []
    return held[0] if len(held) == 1 else identity("operator", DEFAULT_OPERATOR)


def fleet_identities(manifest: FleetManifest, ring: Keyring | None = None) -> list[str]:
    """Every identity a process of the fleet signs as: the manager, each worker capability, the console's operator."""
    idents = ["manager", *(identity("worker", w.capability) for w in manifest.spec.workers)]
    operator = console_operator(manifest, ring)
    if operator is not None:
        idents.append(operator)
    return idents


def ensure_keyring(manifest: FleetManifest, path: Path) -> tuple[Keyring, list[str]]:
    """The keyring at ``path`` holding every key the fleet needs, made or completed; and the identities added.

    A keyring that has an identity's public key but not its private key (it was made elsewhere)
    is refused, naming the identity: a new key would silently stop the old holder's messages.
    """
    added: list[str] = []
    if (path / "keyring.json").exists():
        ring = Keyring.load(path)
    else:
        ring = Keyring.init(path, operator=DEFAULT_OPERATOR)
        added += list(ring)
    for ident in fleet_identities(manifest, ring):
        if ident in ring.private:
            continue
        if ident in ring.public:
            raise KeyringError(f"{path} has the public key of {ident} but not its private key, so this fleet "
                               f"cannot sign as it: run `fleet up` where that key is, or pass --keys DIR")
        role, name = role_of(ident)
        if role == "manager":
            ring.add("manager")
        else:
            ring.add("worker" if role == "worker" else "operator", name)
        added.append(ident)
    return ring, added


def share_name(ident: str) -> str:
    """The directory (and Secret suffix) of one identity's share: ``manager``, ``worker-python``, ``operator-admin``."""
    role, name = role_of(ident)
    return f"{role}-{name}" if name else role


def hand_out(manifest: FleetManifest, ring: Keyring, root: Path) -> KeyShares:
    """Export one directory per identity of the fleet under ``root``, and a public-only one.

    ``root`` is emptied first, so no private key of an identity the manifest dropped survives. The paths
    are absolute: a process finds its keys wherever it runs.
    """
    root = root.absolute()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, mode=0o700)
    shares = {ident: ring.export(root / share_name(ident), [ident]).path for ident in fleet_identities(manifest, ring)}
    public = ring.export(root / PUBLIC_SHARE, []).path
    return KeyShares(shares, public, console_operator(manifest, ring))
