"""What proving a worker's reply costs: an Ed25519 signature against a MAC for the manager, A/B in one process.

Run from the repository root::

    python benchmarks/reply_auth.py [--rounds 31]

Each round times a batch of encodes (the worker's side) and a batch of decodes (the manager's) of
the same ``done`` reply, with a 300-byte output like the peer race's, once signed and once MAC'd
(``Codec(reply_macs=...)``), back to back; the figures are medians over rounds, and the ratio is the
median of the per-round ratios, which stays meaningful on a loaded machine. Each side holds only
its own private key, as in a fleet (``Keyring.export``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _microbench import per_call_us  # run as a script: benchmarks/ is on the path

from protocol.codec import Codec
from protocol.envelope import Envelope
from protocol.keyring import Keyring
from protocol.messages import Done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="reply-auth-"))
    ring = Keyring.init(root / "all", operator="bench")
    ring.add("worker", "x")
    worker_keys, manager_keys = ring.export(root / "worker", ["worker:x"]), ring.export(root / "manager", ["manager"])
    reply = Envelope(run_id="r" * 32, task_id="t" * 32, attempt=1, sender="worker-1",
                     body=Done(output={"seq": 1, "data": "x" * 300}))
    sides = {}
    for name, macs in (("signed", False), ("mac", True)):
        worker = Codec(keyring=worker_keys, signers=("worker:x",), reply_macs=macs)
        manager = Codec(keyring=manager_keys, signers=("manager",))
        frame = worker.encode(reply)
        assert manager.decode(frame, stream="results.x").signer == "worker:x"
        sides[name] = (lambda w=worker: w.encode(reply), lambda m=manager, f=frame: m.decode(f, stream="results.x"))
    times: dict[tuple[str, str], list[float]] = {(n, s): [] for n in sides for s in ("encode", "decode")}
    for _ in range(args.rounds):
        for name, (encode, decode) in sides.items():
            times[name, "encode"].append(per_call_us(encode, args.batch))
            times[name, "decode"].append(per_call_us(decode, args.batch))
    print(f"median of {args.rounds} rounds of {args.batch}; µs per reply")
    print(f"{'':8} {'signed':>8} {'mac':>8} {'mac/signed':>11}")
    for step in ("encode", "decode"):
        ratio = statistics.median(m / s for m, s in zip(times["mac", step], times["signed", step], strict=True))
        print(f"{step:8} {statistics.median(times['signed', step]):8.1f} {statistics.median(times['mac', step]):8.1f} "
              f"{ratio:11.2f}")


if __name__ == "__main__":
    main()
