"""``python -m orchestrator.simulator --port 8000``."""

from __future__ import annotations

import sys

from .cli import serve

if __name__ == "__main__":
    sys.exit(serve())
