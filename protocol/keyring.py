"""Who may say what on the bus: one Ed25519 key per role, kept in a directory.

Identities are strings: ``manager``, ``worker:<capability>`` and ``operator:<name>``. Signatures
are asymmetric, so the manager (which must verify everyone) holds no key that lets it be
impersonated by a worker, and a worker's key signs only that capability's replies.

Layout of a keyring directory (the default is ``.orchestrator/keys``, or ``ORCH_KEYS``)::

    keyring.json          public keys of every identity (safe to share; every process reads it)
    manager.key           private keys, mode 0600, one file per identity this machine may sign as
    worker.<cap>.key
    operator.<name>.key

A process holds only the private keys of the roles it plays: a Kubernetes Secret per role
carries ``keyring.json`` and that role's ``.key`` file. Rotating a key keeps the old public key
as ``previous`` until it is retired, so messages signed just before the rotation still verify.

A message that has exactly one reader (a worker's reply: only the manager reads results streams)
carries a MAC instead of a signature (:meth:`Keyring.mac`): a keyed BLAKE2b tag under a key that
only its sender and its reader can derive (X25519 between the sender's private key and the
reader's public key, both converted from their Ed25519 keys). It proves the same thing to that
reader for about a twentieth of the CPU of a signature and its check; no third process can check it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from nacl import bindings as sodium
from nacl.exceptions import BadSignatureError
from nacl.exceptions import RuntimeError as SodiumError

from protocol.errors import BadSignature, ConfigError

__all__ = (
    "DEFAULT_KEYS_DIR",
    "MAC_BYTES",
    "KeyInfo",
    "Keyring",
    "KeyringError",
    "Role",
    "identity",
    "keys_dir",
    "role_of",
)

DEFAULT_KEYS_DIR = Path(".orchestrator/keys")
PUBLIC_FILE = "keyring.json"
Role = Literal["manager", "worker", "operator"]
ROLES: tuple[Role, ...] = ("manager", "worker", "operator")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAC_BYTES = 32
_MAC_PERSON = b"orch.mac.v1"  # domain separation: these keys make MACs of bus messages, nothing else
_CHECKED_KEPT = 1024  # batch signatures remembered by verify_once (a batch is at most 256 messages)


class KeyringError(ConfigError):
    """A keyring that is missing, unreadable, or lacks the key a process needs."""


def keys_dir(cli_value: str | os.PathLike[str] | None = None) -> Path:
    """The keyring directory: the flag, else ``ORCH_KEYS``, else ``.orchestrator/keys``."""
    return Path(cli_value or os.environ.get("ORCH_KEYS") or DEFAULT_KEYS_DIR)


def identity(role: Role, name: str = "") -> str:
    """``manager``, ``worker:<capability>`` or ``operator:<name>``, with the name checked."""
    if role not in ROLES:
        raise KeyringError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    if role == "manager":
        if name:
            raise KeyringError("the manager role takes no name")
        return "manager"
    if not _NAME.match(name):
        raise KeyringError(f"invalid {role} name {name!r}: use letters, digits, '_', '.', '-' (at most 128)")
    return f"{role}:{name}"


def role_of(ident: str) -> tuple[str, str]:
    """``("worker", "echo")`` for ``worker:echo``; ``("manager", "")`` for ``manager``."""
    role, _, name = ident.partition(":")
    return role, name


def _file_of(ident: str) -> str:
    role, name = role_of(ident)
    return f"{role}.{name}.key" if name else f"{role}.key"


def _ident_of(filename: str) -> str | None:
    stem = filename.removesuffix(".key")
    if stem == filename:
        return None
    role, _, name = stem.partition(".")
    if role == "manager" and not name:
        return "manager"
    if role in ("worker", "operator") and _NAME.match(name):
        return f"{role}:{name}"
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(public: bytes) -> str:
    """A short, stable name for a public key (the first 16 hex digits of its SHA-256)."""
    return hashlib.sha256(public).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What ``keys list`` shows for one identity."""

    identity: str
    role: str
    name: str
    fingerprint: str
    created: str
    private: bool  # whether this directory holds its private key
    previous: int  # retired-but-still-accepted public keys, after a rotation

    def to_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "role": self.role, "name": self.name, "fingerprint": self.fingerprint,
                "created": self.created, "private": self.private, "previous": self.previous}


@dataclass(slots=True)
class _Public:
    current: bytes
    created: str
    previous: tuple[bytes, ...] = ()


@dataclass
class Keyring:
    """The public keys of every identity, and the private keys this directory holds."""

    path: Path
    public: dict[str, _Public] = field(default_factory=dict)
    private: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    # Raw keys for libsodium, which signs and verifies about twice as fast as OpenSSL here (the
    # files stay PEM, read and written with cryptography).
    _verifiers: dict[str, tuple[bytes, ...]] = field(default_factory=dict, repr=False)
    _signers: dict[str, tuple[Ed25519PrivateKey, bytes]] = field(default_factory=dict, repr=False)
    # (sender, reader, the other side's public key) -> MAC key: one X25519 per pair and key, not per message
    _mac_keys: dict[tuple[str, str, bytes], bytes] = field(default_factory=dict, repr=False)
    # Signatures verify_once checked, oldest first: a batch's one signature arrives with each of its messages.
    _checked: OrderedDict[tuple[str, bytes, bytes], None] = field(default_factory=OrderedDict, repr=False)
    _loaded_mtime: float = field(default=0.0, repr=False)

    # -- creating and changing ---------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str], *, operator: str = "admin") -> Keyring:
        """A new keyring at ``path`` with the manager's key and one operator key; refuses to overwrite."""
        root = Path(path)
        if (root / PUBLIC_FILE).exists():
            raise KeyringError(f"{root / PUBLIC_FILE} already exists: add keys to it with 'orchestrator keys add'")
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        ring = cls(root)
        ring.add("manager")
        ring.add("operator", operator)
        return ring

    def add(self, role: Role, name: str = "", *, rotate: bool = False) -> str:
        """Make a key for ``role``/``name`` and save it; ``rotate`` replaces an existing one."""
        ident = identity(role, name)
        old = self.public.get(ident)
        if old is not None and not rotate:
            raise KeyringError(f"{ident} already has a key in {self.path} (use --rotate to replace it)")
        key = Ed25519PrivateKey.generate()
        self._write_private(ident, key)
        previous = (old.current, *old.previous)[:2] if old is not None else ()
        self.public[ident] = _Public(_public_bytes(key.public_key()), _now(), previous)
        self.private[ident] = key
        self._forget_derived()
        self._save_public()
        return ident

    def retire(self, ident: str) -> int:
        """Stop accepting the keys ``ident`` had before its last rotation; how many were dropped."""
        entry = self._entry(ident)
        dropped = len(entry.previous)
        entry.previous = ()
        self._forget_derived()
        self._save_public()
        return dropped

    def remove(self, ident: str) -> None:
        """Forget ``ident`` entirely: its messages stop verifying once processes reload the keyring."""
        self._entry(ident)
        del self.public[ident]
        self.private.pop(ident, None)
        self._forget_derived()
        with contextlib.suppress(FileNotFoundError):
            (self.path / _file_of(ident)).unlink()
        self._save_public()

    def export(self, destination: str | os.PathLike[str], identities: Iterable[str]) -> Keyring:
        """Copy the public keyring and only the named private keys to ``destination`` (one process's share)."""
        dest = Path(destination)
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        ring = Keyring(dest, public=dict(self.public))
        ring._save_public()
        for ident in identities:
            ring.private[ident] = self.signing_key(ident)
            ring._write_private(ident, ring.private[ident])
        return ring

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """The keyring at ``path``; KeyringError naming the file when it is missing or damaged."""
        ring = cls(Path(path))
        ring._load_public()
        for entry in sorted(ring.path.iterdir()):
            ident = _ident_of(entry.name)
            if ident is None:
                continue
            ring.private[ident] = _read_private(entry)
            mine = ring.public.get(ident)
            if mine is None or _public_bytes(ring.private[ident].public_key()) != mine.current:
                raise KeyringError(f"{entry}: private key for {ident} does not match the public key in "
                                   f"{ring.path / PUBLIC_FILE} (rotated elsewhere? copy both files again)")
        return ring

    @classmethod
    def find(cls, path: str | os.PathLike[str] | None = None) -> Keyring | None:
        """The keyring at ``path`` (or ``ORCH_KEYS`` / the default) if one exists there, else None."""
        root = keys_dir(path)
        return cls.load(root) if (root / PUBLIC_FILE).exists() else None

    def _load_public(self) -> None:
        source = self.path / PUBLIC_FILE
        try:
            stat = source.stat()
            raw = json.loads(source.read_text(encoding="utf-8"))
            keys = raw["keys"]
            self.public = {
                ident: _Public(base64.b64decode(entry["public"]), str(entry.get("created", "")),
                               tuple(base64.b64decode(p) for p in entry.get("previous", ())))
                for ident, entry in keys.items()
            }
        except FileNotFoundError as exc:
            raise KeyringError(f"no keyring at {self.path} (create one with 'orchestrator keys init', "
                               f"or pass --keys DIR / set ORCH_KEYS)") from exc
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyringError(f"{source}: not a keyring file: {type(exc).__name__}: {exc}") from exc
        if any(len(p.current) != 32 for p in self.public.values()):
            raise KeyringError(f"{source}: a public key is not 32 bytes of Ed25519")
        self._forget_derived()
        self._loaded_mtime = stat.st_mtime

    def reload_if_changed(self) -> bool:
        """Re-read the public keys when ``keyring.json`` changed on disk (a key added or rotated)."""
        try:
            mtime = (self.path / PUBLIC_FILE).stat().st_mtime
        except OSError:
            return False
        if mtime == self._loaded_mtime:
            return False
        self._load_public()
        return True

    # -- using -------------------------------------------------------------------------------

    def infos(self) -> list[KeyInfo]:
        """Every identity, sorted: managers, then operators, then workers."""
        order = {"manager": 0, "operator": 1, "worker": 2}
        out = []
        for ident, entry in self.public.items():
            role, name = role_of(ident)
            out.append(KeyInfo(ident, role, name, fingerprint(entry.current), entry.created,
                               ident in self.private, len(entry.previous)))
        return sorted(out, key=lambda k: (order.get(k.role, 3), k.name))

    def signing_key(self, ident: str) -> Ed25519PrivateKey:
        """The private key of ``ident``; KeyringError naming the command that makes one."""
        key = self.private.get(ident)
        if key is None:
            raise KeyringError(f"no private key for {ident} in {self.path} ({_make_command(ident)})")
        return key

    def operators(self) -> list[str]:
        """The operator identities whose private keys this directory holds."""
        return sorted(i for i in self.private if i.startswith("operator:"))

    def sign(self, ident: str, payload: bytes) -> bytes:
        """``ident``'s Ed25519 signature over ``payload``; KeyringError when this directory lacks its key."""
        signature: bytes = sodium.crypto_sign(payload, self._secret(ident))[:sodium.crypto_sign_BYTES]
        return signature

    def verify(self, ident: str, signature: bytes, payload: bytes) -> None:
        """Raise BadSignature unless ``signature`` is ``ident``'s over ``payload``."""
        if len(signature) == sodium.crypto_sign_BYTES:
            signed = signature + payload
            for key in self._public_keys(ident):
                try:
                    sodium.crypto_sign_open(signed, key)
                    return
                except BadSignatureError:
                    continue
        raise BadSignature(f"signature does not match {ident!r}'s key")

    def verify_once(self, ident: str, signature: bytes, payload: bytes) -> None:
        """``verify``, remembering the last signatures that passed, so one seen again costs a lookup.

        For a batch's signature (:mod:`protocol.batch_proof`), which every message of the batch carries.
        Verifying is deterministic, so a remembered (identity, signature, bytes) passes again; the memory
        is dropped with the keys whenever they change.
        """
        key = (ident, signature, payload)
        if key in self._checked:
            return
        self.verify(ident, signature, payload)
        self._checked[key] = None
        if len(self._checked) > _CHECKED_KEPT:
            self._checked.popitem(last=False)

    def mac(self, sender: str, reader: str, payload: bytes) -> bytes:
        """A tag over ``payload`` that only ``sender`` (whose private key this must hold) and ``reader`` can make."""
        return _tag(self._mac_key(sender, reader, self._entry(reader).current, mine=sender), payload)

    def check_mac(self, sender: str, reader: str, tag: bytes, payload: bytes) -> None:
        """Raise BadSignature unless ``tag`` is ``sender``'s MAC for ``reader`` (whose private key this holds)."""
        if reader not in self.private:
            raise BadSignature(f"the message carries a MAC for {reader!r}, and this process holds no key of "
                               f"{reader!r} to check it")
        if len(tag) == MAC_BYTES:
            for public in self._public_keys(sender):
                if hmac.compare_digest(_tag(self._mac_key(sender, reader, public, mine=reader), payload), tag):
                    return
        raise BadSignature(f"MAC does not match {sender!r}'s key")

    def _secret(self, ident: str) -> bytes:
        """libsodium's 64-byte secret key of ``ident`` (seed and public key), made once per key."""
        key = self.signing_key(ident)
        cached = self._signers.get(ident)
        if cached is None or cached[0] is not key:  # first use, or the key was rotated since
            _, secret = sodium.crypto_sign_seed_keypair(key.private_bytes_raw())
            cached = self._signers[ident] = (key, secret)
        return cached[1]

    def _public_keys(self, ident: str) -> tuple[bytes, ...]:
        """``ident``'s accepted public keys, current first; keyring.json is re-read once for a stranger."""
        keys = self._verifiers.get(ident)
        if keys is None:
            entry = self.public.get(ident)
            if entry is None and self.reload_if_changed():
                entry = self.public.get(ident)
            if entry is None:
                raise BadSignature(f"signed by {ident!r}, which has no key in the keyring")
            keys = (entry.current, *entry.previous)
            self._verifiers[ident] = keys
        return keys

    def _mac_key(self, sender: str, reader: str, other: bytes, *, mine: str) -> bytes:
        """The MAC key of ``sender`` -> ``reader``, from this side's private key (``mine``) and the other's public."""
        cache_key = (sender, reader, other)
        key = self._mac_keys.get(cache_key)
        if key is None:
            secret = self._secret(mine)
            own = secret[32:]  # libsodium keeps the public key in the secret key's second half
            try:
                shared = sodium.crypto_scalarmult(sodium.crypto_sign_ed25519_sk_to_curve25519(secret),
                                                  sodium.crypto_sign_ed25519_pk_to_curve25519(other))
            except SodiumError as exc:  # a public key off the curve, or of small order: no secret to share
                raise BadSignature(f"the public key of {reader if mine == sender else sender!r} cannot make a "
                                   f"MAC key") from exc
            sender_public, reader_public = (own, other) if mine == sender else (other, own)
            # Both identities, both keys and the direction are bound in: a key for one pair and way is no other's.
            key = hashlib.blake2b(shared + sender_public + reader_public + f"{sender}>{reader}".encode(),
                                  digest_size=32, person=_MAC_PERSON).digest()
            self._mac_keys[cache_key] = key
        return key

    def _forget_derived(self) -> None:
        """Drop what was derived from keys (after a change of keys): it is made again on next use."""
        self._verifiers.clear()
        self._mac_keys.clear()
        self._checked.clear()

    def _entry(self, ident: str) -> _Public:
        entry = self.public.get(ident)
        if entry is None:
            known = ", ".join(sorted(self.public)) or "none"
            raise KeyringError(f"no key for {ident!r} in {self.path} (known: {known})")
        return entry

    def _write_private(self, ident: str, key: Ed25519PrivateKey) -> None:
        target = self.path / _file_of(ident)
        data = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        tmp = target.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)

    def _save_public(self) -> None:
        doc = {"version": 1, "keys": {
            ident: {"public": _b64(e.current), "created": e.created, "previous": [_b64(p) for p in e.previous]}
            for ident, e in sorted(self.public.items())
        }}
        target = self.path / PUBLIC_FILE
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, target)
        self._loaded_mtime = target.stat().st_mtime
        self._forget_derived()

    def __iter__(self) -> Iterator[str]:
        return iter(self.public)


def _tag(key: bytes, payload: bytes) -> bytes:
    return hashlib.blake2b(payload, key=key, digest_size=MAC_BYTES).digest()


def _read_private(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyringError(f"{path}: not a private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyringError(f"{path}: not an Ed25519 private key")
    return key


def _make_command(ident: str) -> str:
    role, name = role_of(ident)
    if role == "manager":
        return "create one with 'orchestrator keys init'"
    return f"create one with 'orchestrator keys add {role} {name}'"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
