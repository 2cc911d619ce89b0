"""A deterministic toy tokenizer: short word pieces with their leading whitespace.

Usage, context checks, /tokenize and the prefix cache all count with this one tokenizer, so
the numbers agree with each other (never with a real model's; tests must not hard-code them).
"""

from __future__ import annotations

import re
import zlib

__all__ = ("Tokenizer",)

# A piece is optional leading whitespace plus up to 4 word characters or one symbol; a run of
# trailing whitespace is a piece of its own. Joining the pieces gives back the text exactly.
_PIECE = re.compile(r"\s*(?:\w{1,4}|[^\w\s])|\s+")


class Tokenizer:
    """Maps text to token ids and back; the vocabulary grows as new pieces appear, up to ``vocab_size``.

    Once the vocabulary is full, a new piece shares the id of a known one (chosen by a stable hash),
    so ids never leave ``range(vocab_size)``; such pieces decode to the piece that owns the id.
    """

    def __init__(self, vocab_size: int = 151936) -> None:
        self.vocab_size = vocab_size
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = []

    @property
    def size(self) -> int:
        """How many distinct pieces have ids so far."""
        return len(self._pieces)

    def pieces(self, text: str) -> list[str]:
        """Split ``text`` into pieces."""
        return _PIECE.findall(text)

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text``."""
        ids = self._ids
        out: list[int] = []
        for piece in _PIECE.findall(text):
            tid = ids.get(piece)
            if tid is None:
                if len(self._pieces) < self.vocab_size:
                    tid = ids[piece] = len(self._pieces)
                    self._pieces.append(piece)
                else:
                    tid = zlib.crc32(piece.encode()) % self.vocab_size
            out.append(tid)
        return out

    def decode(self, ids: list[int]) -> str:
        """Return the text of ``ids``; unknown ids decode to nothing."""
        n = len(self._pieces)
        return "".join(self._pieces[i] for i in ids if 0 <= i < n)

    def count(self, text: str) -> int:
        """Return how many tokens ``text`` has."""
        return len(_PIECE.findall(text))
