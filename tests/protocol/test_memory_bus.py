"""What only the in-process bus has to get right (the contract both buses share is in test_bus_contract.py)."""

from __future__ import annotations

import anyio

from protocol.bus import BusSettings, MemoryBus
from protocol.envelope import Envelope
from protocol.messages import Assign


async def test_lease_bookkeeping_stays_the_size_of_the_work_in_flight() -> None:
    # Every lease given is remembered until it comes up; renewals and acknowledgements leave stale ones behind,
    # which must not pile up for a lease's length in a busy process.
    bus = MemoryBus(BusSettings(lease_s=3600.0))
    for i in range(300):
        await bus.publish("tasks.x", Envelope(run_id="r", task_id=f"t{i}", attempt=1,
                                              body=Assign(capability="x", instruction="")))
    deliveries = []
    with anyio.fail_after(10):
        async for d in bus.consume("tasks.x", group="g", consumer="c"):
            deliveries.append(d)
            if len(deliveries) == 300:
                break
    for _ in range(20):
        for d in deliveries[:10]:
            await bus.renew(d)
    for d in deliveries[10:]:
        await bus.ack(d)
    group = bus._streams["tasks.x"].groups["g"]
    assert len(group.pending) == 10
    assert len(group.leases) <= 2 * len(group.pending) + 64
    assert group.next_deadline() is not None
