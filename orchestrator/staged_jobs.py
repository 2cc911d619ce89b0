"""Jobs too big for one bus message: staged as a value, sent as a submission that names their digest.

``orchestrator submit`` sends a job in its submission, and a bus frame holds at most 1 MiB: about
7,000-10,000 tasks. A bigger job is written to the bus's value ``staged_job_key(run_id)`` first (in
pieces, so the client never joins it into one buffer), and the submission carries its size, its
BLAKE2b-256 and the start of its goal (for ``status`` while it waits). The manager reads the value only up to its own ``max_job_bytes``, checks
the digest against the signed submission (anyone who can write to Redis can write the value; only an
operator's key can sign the digest), then validates the job like any other and deletes the value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

from protocol.bus import Bus
from protocol.errors import ValueTooLarge
from protocol.keys import staged_job_key
from protocol.messages import StagedJob, Submit

__all__ = ("INLINE_MAX_BYTES", "MAX_JOB_BYTES", "STAGED_TTL_S", "StagedJobError", "discard", "submission",
           "unstage")

INLINE_MAX_BYTES = 256 * 1024  # a job bigger than this as msgpack is staged (its submission stays small)
MAX_JOB_BYTES = 256 * 1024 * 1024  # what a manager reads of a staged job by default (100,000 small tasks: ~12 MB)
STAGED_TTL_S = 7 * 24 * 3600.0  # a submission waits this long for a manager to take it


class StagedJobError(Exception):
    """A staged job that cannot be used; the message says why, for the run's failure reason."""


async def submission(bus: Bus, run_id: str, header: dict[str, Any], tasks: Iterable[Any], *,
                     source: str = "") -> Submit:
    """The submission of the job ``{**header, "tasks": [*tasks]}`` (plain data); a big job is staged on ``bus``.

    Staged as msgpack: the job without its tasks, then each task as an object of its own, so the manager
    validates one task at a time (``parse_job_in_parts``) and this side never joins the parts. ``tasks`` is
    taken one at a time: each is kept as data only while the job may still travel inline, so a caller that
    makes them as they are taken (``processes.submit_job``) never holds a big job's data whole.
    """
    parts: list[bytes] = [msgpack.packb(header, use_bin_type=True)]
    size = len(parts[0])
    inline: list[Any] | None = [] if size <= INLINE_MAX_BYTES else None  # None once the job is too big for that
    for task in tasks:
        parts.append(msgpack.packb(task, use_bin_type=True))
        size += len(parts[-1])
        if inline is not None and size <= INLINE_MAX_BYTES:
            inline.append(task)
        else:
            inline = None
    if inline is not None:
        return Submit(job={**header, "tasks": inline}, source=source)
    digest = hashlib.blake2b(digest_size=32)
    for part in parts:
        digest.update(part)
    await bus.put_values_in_parts({staged_job_key(run_id): parts}, ttl_s=STAGED_TTL_S)
    # Only what status shows of a queued run: the goal itself may be as big as the frame.
    return Submit(job={"goal": str(header.get("goal", ""))[:200]}, source=source,
                  staged=StagedJob(size=size, digest=digest.hexdigest(), tasks=len(parts) - 1))


async def unstage(bus: Bus, run_id: str, staged: StagedJob, *,
                  max_bytes: int = MAX_JOB_BYTES) -> tuple[Any, Iterator[Any]]:
    """The staged job's header and its tasks (decoded one at a time as they are taken), checked against its
    submission; StagedJobError saying why it cannot be used (also from the tasks, for one that is not msgpack)."""
    key = staged_job_key(run_id)
    if staged.size > max_bytes:
        raise StagedJobError(f"the staged job is {staged.size} bytes, over this manager's max_job_bytes ({max_bytes})")
    try:
        packed = await bus.get_value(key, max_bytes=staged.size)
    except ValueTooLarge:  # longer than the signed size: never read whole
        raise StagedJobError(f"the staged job {key!r} is longer than the {staged.size} bytes its signed "
                             "submission names (changed in Redis after it was submitted?)") from None
    if packed is None:
        raise StagedJobError(f"the staged job {key!r} is gone (it waits {STAGED_TTL_S / 86400:g} days for a "
                             "manager, then expires)")
    if len(packed) != staged.size or hashlib.blake2b(packed, digest_size=32).hexdigest() != staged.digest:
        raise StagedJobError(f"the staged job {key!r} does not match the size and digest its signed submission "
                             "names (changed in Redis after it was submitted?)")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(packed),
                                object_pairs_hook=_SharedStrings())
    unpacker.feed(packed)
    del packed  # the unpacker holds its own copy
    objects = _decoded(unpacker, key)
    try:
        header = next(objects)
    except StopIteration:
        raise StagedJobError(f"the staged job {key!r} is empty") from None
    return header, objects


class _SharedStrings:
    """Builds each map with one object per distinct string, as job files are read (orchestrator/yaml_file.py):
    a big job repeats its keys, capabilities and often its instructions in every task, and the records made
    from it keep them for the whole run."""

    def __init__(self) -> None:
        self._strings: dict[str, str] = {}

    def __call__(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        one = self._strings.setdefault
        return {one(k, k) if type(k) is str else k: one(v, v) if type(v) is str else v for k, v in pairs}


def _decoded(unpacker: msgpack.Unpacker, key: str) -> Iterator[Any]:
    try:
        yield from unpacker
    except Exception as exc:  # msgpack raises a dozen unrelated types on garbage
        raise StagedJobError(f"the staged job {key!r} is not valid msgpack: {type(exc).__name__}: {exc}") from None


async def discard(bus: Bus, run_id: str) -> None:
    """Free the staged job once its run is recorded (or refused)."""
    await bus.delete_value(staged_job_key(run_id))
