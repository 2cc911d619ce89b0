"""What one signature per batch saves: assigns encoded one by one against ``Codec.encode_many``, A/B in one process.

Run from the repository root::

    python benchmarks/batch_sign.py [--rounds 15] [--sizes 2,8,64,256]

Each round encodes the same assigns (a 300-byte input, like the peer race's) once per message
(``encode``, a signature each) and in batches of each size (``encode_many``, one signature a batch),
back to back, and decodes them as a worker holding only its own key would: every message of a batch
checks its path, and the batch's signature is verified for its first message only. Figures are
medians over rounds in µs per message; ratios are medians of per-round ratios against one by one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from protocol.codec import Codec
from protocol.envelope import Envelope
from protocol.keyring import Keyring
from protocol.messages import Assign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", default="2,8,64,256")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="batch-sign-"))
    ring = Keyring.init(root / "all", operator="bench")
    ring.add("worker", "x")
    manager = Codec(keyring=ring.export(root / "manager", ["manager"]), signers=("manager",))
    ring.export(root / "worker", ["worker:x"])
    count = max(sizes) * 2
    assigns = [Envelope(run_id=f"{i:032x}", task_id="t", attempt=1, sender="manager",
                        body=Assign(capability="x", instruction="noop", input={"seq": i, "body": "x" * 300}))
               for i in range(count)]
    items = [(envelope, "manager") for envelope in assigns]

    def timed(batch: int) -> tuple[float, float]:
        worker = Codec(keyring=Keyring.load(root / "worker"), signers=("worker:x",))  # a new reader: nothing remembered
        start = time.perf_counter()
        if batch == 1:
            frames = [manager.encode(e, signer="manager") for e in assigns]
        else:
            frames = [f for i in range(0, count, batch) for f in manager.encode_many(items[i:i + batch])]
        encoded = time.perf_counter()
        for frame in frames:
            worker.decode(frame, stream="tasks.x")
        done = time.perf_counter()
        return (encoded - start) / count * 1e6, (done - encoded) / count * 1e6

    rows = [1, *sizes]
    times: dict[int, list[tuple[float, float]]] = {size: [] for size in rows}
    for _ in range(args.rounds):
        for size in rows:
            times[size].append(timed(size))
    size_of = {size: len(manager.encode_many(items[:size])[-1]) if size > 1 else len(manager.encode(assigns[0]))
               for size in rows}
    print(f"{count} assigns, median of {args.rounds} rounds; µs per message (ratio: against one by one)")
    print(f"{'batch':>6} {'encode':>8} {'ratio':>6} {'decode':>8} {'ratio':>6} {'bytes':>6}")
    for size in rows:
        enc = statistics.median(t[0] for t in times[size])
        dec = statistics.median(t[1] for t in times[size])
        enc_ratio = statistics.median(a[0] / b[0] for a, b in zip(times[size], times[1], strict=True))
        dec_ratio = statistics.median(a[1] / b[1] for a, b in zip(times[size], times[1], strict=True))
        print(f"{size:>6} {enc:8.1f} {enc_ratio:6.2f} {dec:8.1f} {dec_ratio:6.2f} {size_of[size]:>6}")


if __name__ == "__main__":
    main()
