"""The console of a fleet on Redis: a bus that reads (and checks signatures), and one bus per operator that signs.

Who may act is the keyring's business: every operator whose private key the keyring holds (or the
ones named with ``--operator``) gets a login, and that operator's decisions go out on a bus whose
codec signs as that operator alone, so the manager records the key's identity. With
``--insecure`` nothing is signed and the named operators' decisions carry their name as ``by``.
"""

from __future__ import annotations

import functools
import os
from contextlib import AsyncExitStack

from orchestrator import processes
from orchestrator.trust import INSECURE, load_trust
from orchestrator.ui.auth import Operators, operator_identity
from orchestrator.ui.source import RunSource, redis_run_ids
from protocol.bus import Bus
from protocol.keyring import KeyringError

__all__ = ("open_fleet_console",)

CLIENT_RETRY_BUDGET_S = 5.0  # a page's request fails (503) after this long without Redis; the page retries


async def open_fleet_console(stack: AsyncExitStack, *, url: str, namespace: str, lease_s: float,
                             keys: str | os.PathLike[str] | None, insecure: bool,
                             operators: list[str]) -> tuple[RunSource, Operators]:
    """The console's source and operators on Redis at ``url``; buses close with ``stack``.

    ``operators`` names the operators offered a login (default: every operator key the keyring holds).
    Raises KeyringError naming the missing key before anything is opened.
    """
    identities = [operator_identity(name) for name in operators]
    read = INSECURE if insecure else load_trust(keys, [], insecure=False, what="the console")
    ring = read.keyring
    if ring is not None:
        held = ring.operators()
        identities = identities or held
        for ident in identities:
            if ident not in held:
                raise KeyringError(f"the console has no private key for {ident} in {ring.path} "
                                   f"(keys held: {', '.join(held) or 'none'}; add one with "
                                   f"'orchestrator keys add operator {ident.removeprefix('operator:')}')")

    bus = await stack.enter_async_context(processes.open_bus(url, namespace=namespace, lease_s=lease_s,
                                                             retry_budget_s=CLIENT_RETRY_BUDGET_S, trust=read))
    bus_for: dict[str, Bus] = {}
    if ring is not None:
        for ident in identities:
            signing = load_trust(ring, [ident], insecure=False, what=f"the console acting as {ident}")
            bus_for[ident] = await stack.enter_async_context(
                processes.open_bus(url, namespace=namespace, lease_s=lease_s, retry_budget_s=CLIENT_RETRY_BUDGET_S,
                                   trust=signing))
    source = RunSource(bus, redis_run_ids(bus, url),
                       why_still=functools.partial(processes.no_manager_reason, url, namespace=namespace))
    return source, Operators.named(identities, bus_for=bus_for)
