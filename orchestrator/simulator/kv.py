"""KV block accounting with an automatic prefix cache, hashed block by block like vLLM V1."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ("BlockPool", "block_hashes")


def block_hashes(token_ids: list[int], block_size: int, salt: str | None = None) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a partial last block is not hashed)."""
    out: list[int] = []
    parent = hash(("root", salt))
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        out.append(parent)
    return out


class BlockPool:
    """A fixed pool of KV blocks: private blocks per sequence plus shared, reference-counted cached blocks.

    Cached blocks nobody references stay resident until the pool needs room (LRU eviction).
    """

    def __init__(self, num_blocks: int, *, caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.caching = caching
        self.private = 0
        self._refs: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0, LRU first

    @property
    def used(self) -> int:
        """Blocks held by running sequences (idle cached blocks count as free)."""
        return self.private + len(self._refs) - len(self._idle)

    @property
    def free(self) -> int:
        """Blocks available, counting evictable cached blocks."""
        return self.num_blocks - self.used

    def match(self, hashes: list[int], max_blocks: int) -> int:
        """Count leading blocks of ``hashes`` already cached (up to ``max_blocks``), without taking them."""
        if not self.caching:
            return 0
        n = 0
        for h in hashes[:max_blocks]:
            if h not in self._refs:
                break
            n += 1
        return n

    def acquire_cached(self, hashes: list[int]) -> None:
        """Reference cached blocks (all must be present, as found by ``match``)."""
        for h in hashes:
            refs = self._refs[h]
            if refs == 0:
                del self._idle[h]
            self._refs[h] = refs + 1

    def allocate(self, n: int) -> bool:
        """Take ``n`` private blocks, evicting idle cached blocks if needed; False if they do not fit."""
        if n > self.free:
            return False
        while self.num_blocks - self.private - len(self._refs) < n:
            h, _ = self._idle.popitem(last=False)
            del self._refs[h]
        self.private += n
        return True

    def promote(self, hashes: list[int]) -> None:
        """Turn computed private blocks into cached blocks this sequence references."""
        for h in hashes:
            self.private -= 1
            refs = self._refs.get(h)
            if refs is None:
                self._refs[h] = 1
            else:
                # another sequence computed the same block first: share it, drop our copy
                if refs == 0:
                    del self._idle[h]
                self._refs[h] = refs + 1

    def release(self, hashes: list[int], private: int) -> None:
        """Give back a sequence's cached references and private blocks."""
        self.private -= private
        for h in hashes:
            refs = self._refs[h] - 1
            self._refs[h] = refs
            if refs == 0:
                self._idle[h] = None

    def reset_cache(self) -> None:
        """Drop every idle cached block."""
        for h in self._idle:
            del self._refs[h]
        self._idle.clear()
