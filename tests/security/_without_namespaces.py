"""Run a command as an unprivileged uid on a "kernel" that refuses it any namespace: ``_without_namespaces.py UID -- ARGV``.

Needs root. Makes a user namespace mapping root and ``UID`` to themselves, sets its
``user.max_user_namespaces`` to 0 there (so no further user namespace can be made below it, as
on a machine with unprivileged user namespaces switched off), drops to ``UID`` without
capabilities, and execs ``ARGV``. The python worker then finds no namespace it may have.
"""

import ctypes
import os
import sys

_CLONE_NEWUSER = 0x10000000


def main(argv: list[str]) -> int:
    """Fork the child that becomes ``UID`` in the namespace, map it, wait for it, return its exit code."""
    uid, command = int(argv[0]), argv[2:]
    mapped_r, mapped_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(mapped_w)
        os.close(ready_r)
        if ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWUSER) != 0:
            os._exit(120)
        os.write(ready_w, b"x")
        os.read(mapped_r, 1)  # the parent has written our maps
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root to non-root: no capabilities left
        os.execv(command[0], command)
    os.close(mapped_r)
    os.close(ready_w)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 1\n{uid} {uid} 1\n")
    os.write(mapped_w, b"x")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
