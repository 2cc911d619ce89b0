"""Run a command that dies with the process that started it: ``python _lifeline.py PARENT_PID SIGNAL -- ARGV...``.

``fleet up`` starts every process through this file, run as a script (``python -I -S``: standard
library only, nothing of the package imported, so it costs one bare interpreter start). It asks
the kernel for ``SIGNAL`` when its parent dies (``PR_SET_PDEATHSIG``, which survives ``execve``),
makes sure the parent is still ``PARENT_PID`` (it may have died before the request), and then
replaces itself with ``ARGV``. A ``kill -9`` of the supervisor thus reaches every process it
started, which then drains as on a normal stop.
"""

import ctypes
import os
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    """Parse ``PARENT_PID SIGNAL -- ARGV...``, set the parent-death signal and exec ``ARGV``."""
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: _lifeline.py PARENT_PID SIGNAL -- ARGV...\n")
        raise SystemExit(2)
    parent, signum, command = int(argv[0]), int(argv[1]), argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) != 0:
        sys.stderr.write(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}\n")
        raise SystemExit(1)
    if os.getppid() != parent:
        raise SystemExit(1)  # the supervisor died before we could ask to follow it
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"cannot start {command[0]!r}: {exc}\n")
        raise SystemExit(127) from None


if __name__ == "__main__":
    main(sys.argv[1:])
