"""How a process on Redis signs and checks bus messages: its keyring and the roles it plays.

Signing is on by default on Redis. A process that finds no keyring, or not the key of a role it
plays, refuses to start and names the command that makes one; ``--insecure`` (``ORCH_INSECURE=1``)
runs unsigned, loudly. A worker's replies carry a MAC for the manager rather than a signature
unless ``ORCH_SIGN_REPLIES=1`` (then a third party can check them, and a manager of a version
before MACs can read them). See docs/security.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from protocol.codec import Codec
from protocol.keyring import Keyring, KeyringError, keys_dir

__all__ = ("INSECURE", "Trust", "insecure_from_env", "load_trust", "pick_operator", "sign_replies_from_env")

log = structlog.get_logger("orchestrator.trust")


@dataclass(frozen=True, slots=True)
class Trust:
    """A keyring and the identities this process signs as; no keyring means unsigned (insecure)."""

    keyring: Keyring | None
    signers: tuple[str, ...] = ()
    reply_macs: bool = True  # a worker's replies carry a MAC for the manager (False: signed like the rest)

    def codec(self) -> Codec:
        return Codec(keyring=self.keyring, signers=self.signers, reply_macs=self.reply_macs)

    @property
    def signed(self) -> bool:
        return self.keyring is not None


INSECURE = Trust(None)


def insecure_from_env() -> bool:
    """``ORCH_INSECURE`` set to 1/true/yes."""
    return _flag("ORCH_INSECURE")


def sign_replies_from_env() -> bool:
    """``ORCH_SIGN_REPLIES`` set to 1/true/yes: replies are signed rather than carrying a MAC for the manager."""
    return _flag("ORCH_SIGN_REPLIES")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def load_trust(keys: str | os.PathLike[str] | Keyring | None, signers: Sequence[str], *, insecure: bool,
               what: str) -> Trust:
    """The keyring at ``keys`` (flag, ``ORCH_KEYS`` or ``.orchestrator/keys``) holding every key in ``signers``.

    ``what`` names the process in errors ("the manager", "a worker for 'echo'").
    """
    if insecure:
        log.warning("bus_unsigned", process=what,
                    detail="--insecure: messages are not signed or checked; anyone who can write to Redis "
                           "can pose as any role")
        return INSECURE
    if isinstance(keys, Keyring):
        ring = keys
    else:
        root = keys_dir(keys)
        if not (root / "keyring.json").exists():
            first = _make_hint(signers)
            raise KeyringError(f"{what} signs its bus messages, but there is no keyring at {root}: create one with "
                               f"{first}, or point --keys / ORCH_KEYS at one (or pass --insecure to run unsigned)")
        ring = Keyring.load(root)
    for ident in signers:
        ring.signing_key(ident)
    return Trust(ring, tuple(signers), reply_macs=not sign_replies_from_env())


def pick_operator(keys: str | os.PathLike[str] | Keyring | None, name: str | None) -> str:
    """The operator identity a client signs as: ``name`` (``--as`` / ``ORCH_OPERATOR``), or the only one held."""
    if name:
        return f"operator:{name.removeprefix('operator:')}"
    ring = keys if isinstance(keys, Keyring) else Keyring.find(keys)
    held = ring.operators() if ring is not None else []
    if len(held) == 1:
        return held[0]
    where = ring.path if ring is not None else keys_dir(keys if not isinstance(keys, Keyring) else None)
    if not held:
        raise KeyringError(f"no operator key in {where}: create one with 'orchestrator keys add operator NAME' "
                           f"(or 'orchestrator keys init'), or pass --insecure")
    names = ", ".join(h.removeprefix("operator:") for h in held)
    raise KeyringError(f"{where} holds several operator keys ({names}): choose one with --as NAME or ORCH_OPERATOR")


def _make_hint(signers: Sequence[str]) -> str:
    workers = [s.removeprefix("worker:") for s in signers if s.startswith("worker:")]
    if workers:
        adds = " and ".join(f"'orchestrator keys add worker {w}'" for w in workers)
        return f"'orchestrator keys init' then {adds}"
    return "'orchestrator keys init'"
