"""Who may act from the console: operators, their login tokens, and browser sessions.

A person logs in with an operator's login token (printed when the console starts); the console
then sets an HttpOnly, SameSite=Strict session cookie and hands the page a CSRF token that every
action must carry. Without a session the console is read-only, and the server refuses actions.

Which operators exist is pluggable (``Operators``): named on the command line, and each
operator's decisions go out on the bus given for it, so a bus whose codec signs as that operator
is a change at the place operators are built, not here.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass, field

from protocol.bus import Bus
from protocol.errors import ConfigError

__all__ = ("Operator", "Operators", "Session", "Sessions")

OPERATOR_PREFIX = "operator:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Operator:
    """An identity that may act (``operator:NAME``), the token that logs in as it, and the bus its decisions use.

    ``bus`` None sends on the console's own bus.
    """

    identity: str
    token: str = field(repr=False)
    bus: Bus | None = None

    @property
    def name(self) -> str:
        """The part after ``operator:``."""
        return self.identity.removeprefix(OPERATOR_PREFIX)


def operator_identity(name: str) -> str:
    """``operator:NAME`` for a bare name or one already prefixed; raises ConfigError for a name no key could have."""
    bare = name.removeprefix(OPERATOR_PREFIX)
    if not _NAME.match(bare):
        raise ConfigError(f"operator name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-', "
                          "starting with a letter or digit")
    return OPERATOR_PREFIX + bare


class Operators:
    """The operators this console can act as, each with a fresh login token."""

    def __init__(self, operators: list[Operator] | None = None) -> None:
        self._by_identity: dict[str, Operator] = {}
        for op in operators or []:
            if op.identity in self._by_identity:
                raise ConfigError(f"operator {op.identity!r} is given twice")
            self._by_identity[op.identity] = op

    @classmethod
    def named(cls, names: list[str], *, bus_for: dict[str, Bus] | None = None) -> Operators:
        """Operators by name, each with a new random login token; ``bus_for`` maps identities to their bus."""
        ops = []
        for name in names:
            identity = operator_identity(name)
            ops.append(Operator(identity, secrets.token_urlsafe(32), (bus_for or {}).get(identity)))
        return cls(ops)

    def all(self) -> list[Operator]:
        """Every operator, in the order given."""
        return list(self._by_identity.values())

    def get(self, identity: str) -> Operator | None:
        """The operator with this identity, or None."""
        return self._by_identity.get(identity)

    def by_token(self, token: str) -> Operator | None:
        """The operator whose login token this is (compared in constant time), or None."""
        found = None
        for op in self._by_identity.values():
            if hmac.compare_digest(op.token.encode(), token.encode()):
                found = op
        return found


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in browser: who it acts as and the CSRF token its actions must carry."""

    identity: str
    csrf: str = field(repr=False)


class Sessions:
    """Browser sessions in memory: a console restart logs everyone out (tokens are new too)."""

    MAX = 1000  # a flood of logins cannot grow memory without bound; the oldest session goes

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def open(self, identity: str) -> tuple[str, Session]:
        """A new session id (the cookie) and its session."""
        while len(self._sessions) >= self.MAX:
            self._sessions.pop(next(iter(self._sessions)))
        session_id = secrets.token_urlsafe(32)
        session = self._sessions[session_id] = Session(identity, secrets.token_urlsafe(32))
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The session of this cookie value, or None."""
        return self._sessions.get(session_id) if session_id else None

    def close(self, session_id: str | None) -> None:
        """Log out."""
        if session_id:
            self._sessions.pop(session_id, None)
