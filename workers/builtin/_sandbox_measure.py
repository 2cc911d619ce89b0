"""What protections a sandbox process is under, read by the worker from ``/proc``, never told by the sandbox.

The sandbox's snippet process is the second descendant of the process the worker started
(launcher → init → snippet process, see ``_sandbox_child``). Before the worker lets it run the
snippet, :func:`measure` reads its credentials, ``no_new_privs``, seccomp mode, capabilities,
namespaces (compared with the worker's own), network interfaces, mounts and resource limits. Each
of these can only be tightened by an unprivileged process without capabilities, so what holds
when the snippet starts holds until it ends.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ("Measurement", "descendant", "measure")

_NAMESPACES = ("user", "net", "pid", "mnt", "ipc")
_RLIMITS = {"Max cpu time": "rlimit_cpu", "Max address space": "rlimit_as", "Max file size": "rlimit_fsize",
            "Max open files": "rlimit_nofile", "Max processes": "rlimit_nproc", "Max core file size": "rlimit_core"}


@dataclass(frozen=True)
class Measurement:
    """One sandbox process as ``/proc`` shows it to the worker; ``protections()`` names what holds."""

    pid: int
    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    no_new_privs: bool = False
    seccomp: int = 0
    cap_effective: int = -1
    cap_permitted: int = -1
    own_namespaces: tuple[str, ...] = ()  # namespaces that differ from the worker's
    net_interfaces: tuple[str, ...] = ()
    writable_mounts: tuple[str, ...] = ()
    private_proc: bool = False
    rlimits: dict[str, int | None] = field(default_factory=dict)  # soft limits; None is unlimited

    def protections(self, workdir: str, rlimits: dict[str, int]) -> list[str]:
        """Names of the protections this measurement shows, in a stable order.

        ``rlimits`` maps ``rlimit_*`` names to the limit asked for; one is named when the soft limit
        in force is at most that.
        """
        names: list[str] = []
        if self.uids and all(self.uids) and self.gids and all(self.gids):
            names.append("unprivileged_uid")
        if self.uids and not self.groups:
            names.append("no_supplementary_groups")
        if self.cap_effective == 0 and self.cap_permitted == 0:
            names.append("no_capabilities")
        if self.no_new_privs:
            names.append("no_new_privs")
        if self.seccomp:
            names.append("seccomp")
        if "user" in self.own_namespaces:
            names.append("user_namespace")
        if "net" in self.own_namespaces and set(self.net_interfaces) <= {"lo"}:
            names.append("net_namespace")
        names += [f"{ns}_namespace" for ns in ("pid", "mnt", "ipc") if ns in self.own_namespaces]
        if self.private_proc:
            names.append("private_proc")
        if self.uids and all(_within(m, workdir) for m in self.writable_mounts):
            names.append("read_only_fs")
        names += [name for name, wanted in rlimits.items()
                  if (value := self.rlimits.get(name)) is not None and value <= wanted]
        return names

    def to_dict(self) -> dict[str, Any]:
        """The raw figures, for logs and ``SandboxResult.measured``."""
        return asdict(self)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def descendant(pid: int, depth: int) -> int | None:
    """The only child of the only child ... ``depth`` levels below ``pid``, or None when there is not exactly one."""
    for _ in range(depth):
        children = _children(pid)
        if len(children) != 1:
            return None
        pid = children[0]
    return pid


def _status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split())


def _namespace(pid: int | str, name: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{name}")
    except OSError:
        return None


def _interfaces(pid: int) -> tuple[str, ...]:
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]  # two header lines
    return tuple(line.split(":", 1)[0].strip() for line in lines)


def _writable_mounts(pid: int) -> tuple[str, ...]:
    writable = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        parts = line.split()
        mount_point, options = parts[4], parts[5].split(",")
        if "ro" not in options:
            writable.append(mount_point.replace("\\040", " "))
    return tuple(writable)


def _private_proc(pid: int) -> bool:
    # A proc mount of another PID namespace is another superblock, so another device number.
    try:
        return os.stat(f"/proc/{pid}/root/proc").st_dev != os.stat("/proc").st_dev
    except OSError:
        return False


def _rlimits(pid: int) -> dict[str, int | None]:
    limits: dict[str, int | None] = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        for label, name in _RLIMITS.items():
            if line.startswith(label):
                soft = line[len(label):].split()[0]
                limits[name] = None if soft == "unlimited" else int(soft)
    return limits


def measure(pid: int) -> Measurement:
    """Read ``pid``'s protections from ``/proc``; raises ``OSError`` when the process is gone."""
    status = _status(pid)
    own = tuple(ns for ns in _NAMESPACES if (theirs := _namespace(pid, ns)) is not None
                and theirs != _namespace("self", ns))
    return Measurement(
        pid=pid, uids=_ints(status.get("Uid", "")), gids=_ints(status.get("Gid", "")),
        groups=_ints(status.get("Groups", "")), no_new_privs=status.get("NoNewPrivs") == "1",
        seccomp=int(status.get("Seccomp", "0")), cap_effective=int(status.get("CapEff", "-1"), 16),
        cap_permitted=int(status.get("CapPrm", "-1"), 16), own_namespaces=own, net_interfaces=_interfaces(pid),
        writable_mounts=_writable_mounts(pid), private_proc=_private_proc(pid), rlimits=_rlimits(pid),
    )
