"""benchmarks/roundtrip_stages.py stamps stages through wrappers around internal functions; run it small
so that a renamed or reshaped function shows here, not as an empty row in someone's measurement."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_stage_is_stamped_signed_and_unsigned(redis_url: str) -> None:
    done = subprocess.run([sys.executable, "benchmarks/roundtrip_stages.py", "--url", redis_url,
                           "--round-trips", "60", "--repeats", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from roundtrip_stages import STAGES
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = (re.split(r"\s{2,}", line.strip()) for line in done.stdout.splitlines())
    lines = {row[0]: row[1:] for row in rows if len(row) > 1}
    for label, *_ in STAGES:
        cells = lines.get(label)
        assert cells is not None, f"no row for {label!r}:\n{done.stdout}"
        signed, unsigned = cells[0], cells[3]
        # A stage whose stamps were never matched prints '-': a wrapped function was renamed or bypassed.
        assert signed != "-", f"stage {label!r} was not stamped signed:\n{done.stdout}"
        assert unsigned != "-", f"stage {label!r} was not stamped unsigned:\n{done.stdout}"
        assert float(signed) >= 0
        assert float(unsigned) >= 0
    p50 = lines["round trip p50"]
    assert float(p50[0]) > 0
    assert float(p50[1]) > 0
