"""The session keyring (ORCH_KEYS, set by the ``test_keyring`` fixture) as a test client uses it."""

from __future__ import annotations

import os

from orchestrator.trust import Trust, load_trust


def operator_trust() -> Trust:
    """Sign as the session's operator, as ``orchestrator submit`` would."""
    return load_trust(None, ["operator:tests"], insecure=False, what="a test client")


def trust_as(*signers: str) -> Trust:
    """Sign as any identities of the session keyring (a test playing several roles at once)."""
    return load_trust(None, signers, insecure=False, what="a test")


SESSION_VARS = ("ORCH_KEYS", "ORCH_OPERATOR")  # what the test_keyring fixture sets


def env_without_orch(*, keep_keyring: bool) -> dict[str, str]:
    """This process's environment without ``ORCH_*`` settings, keeping the session keyring when asked."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ORCH_") or (keep_keyring and k in SESSION_VARS)}
