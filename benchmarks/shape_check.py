"""What the codec's shape check (``protocol/limits.py``) costs per decoded frame: A/B in one process.

Run from the repository root::

    python benchmarks/shape_check.py [--rounds 31]

For each frame (small and large, unsigned and signed with Ed25519), each round times a batch of
``Codec.decode`` with the check and a batch with the check replaced by a no-op, back to back; the
figures are the median times and the median of the per-round ratios, which stays meaningful on a
loaded machine. Frames of at most 512 bytes are settled from their size and skip the walk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

from _microbench import per_call_us  # run as a script: benchmarks/ is on the path

import protocol.codec as codec_mod
from protocol.codec import Codec
from protocol.envelope import Envelope
from protocol.keyring import Keyring
from protocol.messages import Assign, Done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    ring = Keyring.init(tempfile.mkdtemp() + "/keys", operator="bench")
    ring.add("worker", "x")
    real = codec_mod.check_shape

    def noop(*_: Any, **__: Any) -> None:
        return None

    cases = [
        ("done, small output", Done(output={"a": [1, 2, 3], "b": "text"}), "worker:x", "results.x", 2000),
        ("done, 1000-int output", Done(output=list(range(1000))), "worker:x", "results.x", 300),
        ("assign, 1000 small maps", Assign(capability="x", instruction="i", input=[{"k": i} for i in range(1000)]),
         "manager", "tasks.x", 100),
    ]
    print(f"{'frame':24s} {'codec':8s} {'bytes':>6s}  {'without':>10s}  {'with':>10s}  ratio")
    for name, body, ident, stream, n in cases:
        env = Envelope(run_id="r", task_id="t", attempt=1, body=body)
        for kind, codec in (("unsigned", Codec()), ("signed", Codec(keyring=ring, signers=(ident,)))):
            frame = codec.encode(env, signer=ident) if codec.keyring else codec.encode(env)

            def decode(codec: Codec = codec, frame: bytes = frame, stream: str = stream) -> None:
                codec.decode(frame, stream=stream)

            ratios, with_, without = [], [], []
            for _ in range(args.rounds):
                codec_mod.check_shape = real
                a = per_call_us(decode, n)
                codec_mod.check_shape = noop  # type: ignore[assignment]
                b = per_call_us(decode, n)
                ratios.append(a / b)
                with_.append(a)
                without.append(b)
            codec_mod.check_shape = real
            print(f"{name:24s} {kind:8s} {len(frame):6d}  {statistics.median(without):7.1f} us  "
                  f"{statistics.median(with_):7.1f} us  {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
