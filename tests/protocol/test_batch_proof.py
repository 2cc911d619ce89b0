"""The Merkle tree behind batch signatures: every message's path leads to the root, and nothing else's does."""

from __future__ import annotations

import hashlib
import os

import pytest

from protocol import batch_proof
from protocol.batch_proof import MAX_BATCH, leaf_hash, root_of, signed_root, tree


def _reference_root(leaves: list[bytes]) -> bytes:
    """RFC 9162's MTH, written from the RFC's definition (recursive, no paths), BLAKE2b-256 for SHA-256."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    left, right = _reference_root(leaves[:k]), _reference_root(leaves[k:])
    return hashlib.blake2b(b"\x01" + left + right, digest_size=32).digest()


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(os.urandom(40)) for _ in range(n)]


@pytest.mark.parametrize("size", [*range(1, 34), 127, 128, 129, 255, MAX_BATCH])
def test_every_path_leads_to_the_rfc_root(size: int) -> None:
    leaves = _leaves(size)
    root, paths = tree(leaves)
    assert root == _reference_root(leaves)
    for index, (leaf, path) in enumerate(zip(leaves, paths, strict=True)):
        assert root_of(leaf, index, size, path) == root, index
        assert len(path) <= (size - 1).bit_length()


def test_a_leaf_hash_is_never_a_node_hash() -> None:
    # Domain separation: the 64 bytes of two child hashes as a message do not hash to their parent.
    a, b = _leaves(2)
    root, _ = tree([a, b])
    assert leaf_hash(a + b) != root
    assert leaf_hash(b"") != hashlib.blake2b(b"", digest_size=32).digest()


@pytest.mark.parametrize("size", [2, 3, 5, 8, 13, 64])
def test_a_path_for_another_place_or_size_leads_elsewhere_or_nowhere(size: int) -> None:
    leaves = _leaves(size)
    root, paths = tree(leaves)
    for index, path in enumerate(paths):
        for other in range(size):
            if other != index:
                assert root_of(leaves[index], other, size, path) != root
        # Another size may give the same root (a path only knows its own levels): the signed bytes bind the size.
        signed = signed_root(size, root)
        for other_size in range(max(1, index + 1), size + 3):
            if other_size != size and (other_root := root_of(leaves[index], index, other_size, path)) is not None:
                assert signed_root(other_size, other_root) != signed
        assert root_of(leaf_hash(b"another message"), index, size, path) != root


@pytest.mark.parametrize("size", [2, 7, 16])
def test_a_path_cut_short_grown_or_altered_is_refused(size: int) -> None:
    leaves = _leaves(size)
    root, paths = tree(leaves)
    for index, path in enumerate(paths):
        assert root_of(leaves[index], index, size, path[:-1]) != root
        assert root_of(leaves[index], index, size, [*path, os.urandom(32)]) != root
        flipped = [bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]]
        assert root_of(leaves[index], index, size, flipped) != root


@pytest.mark.parametrize(("index", "size", "path_len"), [
    (0, 0, 0), (-1, 4, 2), (4, 4, 2), (0, MAX_BATCH + 1, 9), (0, 2**32, 1), (0, 4, 40)])
def test_impossible_places_and_sizes_have_no_root(index: int, size: int, path_len: int) -> None:
    assert root_of(leaf_hash(b"m"), index, size, [os.urandom(32)] * path_len) is None


def test_a_single_message_is_its_own_root() -> None:
    [leaf] = _leaves(1)
    assert tree([leaf]) == (leaf, [[]])
    assert root_of(leaf, 0, 1, []) == leaf


def test_batches_are_bounded() -> None:
    with pytest.raises(ValueError, match="1 to 256"):
        tree([])
    with pytest.raises(ValueError, match="1 to 256"):
        tree(_leaves(MAX_BATCH + 1))


def test_the_signed_bytes_bind_the_size_and_cannot_be_a_message() -> None:
    root = os.urandom(32)
    assert signed_root(3, root) != signed_root(4, root)
    assert signed_root(3, root).startswith(batch_proof.SIGNED_PREFIX)
    assert not 0x80 <= signed_root(3, root)[0] <= 0x8F  # a message's signed bytes are a msgpack map
