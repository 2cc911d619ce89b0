"""Parsed generation requests and the simulated sampling details: logprobs with vLLM's structure.

The values are simulated (a deterministic function of token id and position, the sampled token
always ranked first); the shapes are vLLM's for chat and completions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from .tokenizer import Tokenizer

__all__ = ("Choice", "GenParams", "chat_logprobs", "completion_logprobs", "prompt_logprobs", "token_logprob")


@dataclass
class GenParams:
    """What a request asks of generation, checked and normalised."""

    chat: bool
    max_tokens: int
    n: int = 1
    min_tokens: int = 0
    ignore_eos: bool = False
    echo: bool = False
    logprobs: int | None = None  # chat: top_logprobs when logprobs is true; completions: logprobs
    prompt_logprobs: int | None = None
    return_token_ids: bool = False
    tokens_as_ids: bool = False
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False


@dataclass
class Choice:
    """One generated choice: its text pieces and token ids, and how it ended."""

    index: int
    prompt_index: int
    pieces: list[str]
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | None
    echo_text: str = ""
    seq: Any = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """The generated text."""
        return "".join(self.pieces)


def token_logprob(token_id: int, position: int) -> float:
    """The simulated log probability of the sampled token (deterministic, in (-2, 0))."""
    digest = hashlib.blake2b(f"{token_id}:{position}".encode(), digest_size=4).digest()
    return -round(0.001 + int.from_bytes(digest, "big") % 1999 / 1000, 4)


def _alternatives(tok: Tokenizer, token_id: int, position: int, k: int) -> list[tuple[int, float]]:
    """``k`` distinct (token id, logprob) pairs, the sampled token first, the rest strictly less likely.

    Alternatives come from the pieces the tokenizer knows while there are enough, else from the
    whole vocabulary (``k`` may be the vocabulary size: ``-1`` asks for every token).
    """
    lp = token_logprob(token_id, position)
    space = tok.size if k <= tok.size and token_id < tok.size else tok.vocab_size
    k = min(k, space)
    out = [(token_id, lp)]
    out.extend(((token_id + j) % space, round(lp - 0.5 * j - 0.25, 4)) for j in range(1, k))
    return out


def _token_str(tok: Tokenizer, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else tok.decode([token_id])


def chat_logprobs(tok: Tokenizer, token_ids: list[int], top: int, *, as_ids: bool = False,
                  start: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content: list[dict[str, Any]] = []
    for offset, tid in enumerate(token_ids):
        pos = start + offset
        text = _token_str(tok, tid, as_ids)
        alts = _alternatives(tok, tid, pos, top) if top else []
        content.append({
            "token": text, "logprob": token_logprob(tid, pos), "bytes": list(text.encode()),
            "top_logprobs": [{"token": _token_str(tok, a, as_ids), "logprob": lp,
                              "bytes": list(_token_str(tok, a, as_ids).encode())} for a, lp in alts],
        })
    return {"content": content}


def completion_logprobs(tok: Tokenizer, token_ids: list[int], top: int, *, as_ids: bool = False,
                        first_is_prompt_start: bool = False, text_offset: int = 0, start: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a completion: ``text_offset``, ``token_logprobs``, ``tokens``, ``top_logprobs``.

    With ``first_is_prompt_start`` (echo), the first token has no logprob, as the first prompt token has none.
    """
    offsets: list[int] = []
    lps: list[float | None] = []
    tokens: list[str] = []
    tops: list[dict[str, float] | None] = []
    at = text_offset
    for offset, tid in enumerate(token_ids):
        pos = start + offset
        text = _token_str(tok, tid, as_ids)
        offsets.append(at)
        at += len(tok.decode([tid]))
        tokens.append(text)
        if first_is_prompt_start and offset == 0:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(token_logprob(tid, pos))
        alts = _alternatives(tok, tid, pos, max(top, 1))
        tops.append({_token_str(tok, a, as_ids): lp for a, lp in alts})
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens, "top_logprobs": tops}


def prompt_logprobs(tok: Tokenizer, token_ids: list[int], top: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: ``None`` for the first token, then ``{id: {logprob, rank, decoded_token}}``."""
    out: list[dict[str, dict[str, Any]] | None] = [None] if token_ids else []
    for pos, tid in enumerate(token_ids[1:], start=1):
        entry: dict[str, dict[str, Any]] = {}
        for rank, (alt, lp) in enumerate(_alternatives(tok, tid, pos, max(top, 0) + 1), start=1):
            entry[str(alt)] = {"logprob": lp, "rank": rank, "decoded_token": tok.decode([alt])}
        out.append(entry)
    return out
