"""One signature for a batch of messages: a Merkle tree over their signed bytes.

A manager that sends many messages at once (the assigns of the runs it starts together, the history
of every run a commit touched) signs the root of a tree over them once, instead of each message.
Each message then carries that signature, its place in the batch, the batch's size and its audit
path (the sibling hashes from its leaf up to the root: one per level, at most 8 for 256 messages),
so it is checked alone, by a reader that sees no other message of the batch.

The tree is RFC 9162's (Certificate Transparency), with BLAKE2b-256 for SHA-256: a leaf is
H(0x00 || message), a node H(0x01 || left || right), and a batch of n splits at the largest power of
two below n. The signed bytes are ``SIGNED_PREFIX``, n (4 bytes, big-endian) and the root, so a batch
signature is never a signature of a message (those sign a msgpack map, whose first byte is 0x8_).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ("MAX_BATCH", "SIGNED_PREFIX", "leaf_hash", "root_of", "signed_root", "tree")

MAX_BATCH = 256  # messages under one signature; their paths stay at 8 hashes (~270 bytes a message)
SIGNED_PREFIX = b"orchestrator batch v1\x00"
_LEAF, _NODE = b"\x00", b"\x01"
_MAX_PATH = (MAX_BATCH - 1).bit_length()


def leaf_hash(message: bytes) -> bytes:
    """The hash of one message's signed bytes."""
    return hashlib.blake2b(_LEAF + message, digest_size=32).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.blake2b(_NODE + left + right, digest_size=32).digest()


def tree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root over ``leaves`` (leaf hashes, 1 to ``MAX_BATCH``) and each leaf's audit path, lowest level first."""
    if not 0 < len(leaves) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} messages, not {len(leaves)}")
    return _subtree(leaves)


def _subtree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    if len(leaves) == 1:
        return leaves[0], [[]]
    split = 1 << ((len(leaves) - 1).bit_length() - 1)  # the largest power of two below the count
    left, left_paths = _subtree(leaves[:split])
    right, right_paths = _subtree(leaves[split:])
    for path in left_paths:
        path.append(right)
    for path in right_paths:
        path.append(left)
    return _node(left, right), left_paths + right_paths


def root_of(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """The root that ``path`` leads to from ``leaf`` at ``index`` of ``size``, or None when the path cannot be one.

    RFC 9162, 2.1.3.2: a path too short, too long or with the wrong number of hashes for its place gives None.
    """
    if not 0 <= index < size <= MAX_BATCH or len(path) > _MAX_PATH:
        return None
    fn, sn, root = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            root = _node(sibling, root)
            while not fn & 1 and fn:  # the last node of a level with no right sibling moves up unchanged
                fn, sn = fn >> 1, sn >> 1
        else:
            root = _node(root, sibling)
        fn, sn = fn >> 1, sn >> 1
    return root if sn == 0 else None


def signed_root(size: int, root: bytes) -> bytes:
    """What the batch's signature signs."""
    return SIGNED_PREFIX + size.to_bytes(4, "big") + root
