"""The simulated judge's checks: what a spec's description states that can be checked, and nothing else.

A description such as "A headline of at most 60 characters." or "At least three facts, one per
line, mentioning 'Redis'" makes claims a program can check: a length in characters or words, a
count of lines, sentences or items, words or phrases the answer must contain. Each claim found is
checked; an answer that meets them all passes, and so does any answer to a description with no
checkable claim (the simulator cannot judge quality, so it does not pretend to).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ("Claim", "check_answer", "claims")

_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20, "thirty": 30, "fifty": 50, "hundred": 100,
    "a single": 1, "single": 1,
}
_NUM = r"(\d+|" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")"
_AT_LEAST = r"at least|no fewer than|not fewer than|a minimum of|minimum of|min\.?"
_AT_MOST = r"at most|no more than|not more than|up to|a maximum of|maximum of|max\.?|no longer than|not exceeding"
_BELOW = r"fewer than|less than|under|shorter than|below"
_ABOVE = r"more than|over|longer than"
_UNITS = {
    "character": "characters", "characters": "characters", "char": "characters", "chars": "characters",
    "letter": "characters", "letters": "characters",
    "word": "words", "words": "words",
    "line": "lines", "lines": "lines",
    "sentence": "sentences", "sentences": "sentences",
    "paragraph": "paragraphs", "paragraphs": "paragraphs",
}
_COMPARED = re.compile(
    rf"\b(?:(?P<op>{_AT_LEAST}|{_AT_MOST}|{_BELOW}|{_ABOVE}|exactly|precisely)\s+{_NUM}"
    rf"|between\s+{_NUM}\s+(?:and|to)\s+{_NUM}"
    rf"|{_NUM}\s*(?:-|to)\s*{_NUM}"
    rf"|{_NUM}(?=(?:[\s-]+[\w-]+){{1,4}}?\s+or\s+(?P<suffix>fewer|less|more|shorter|longer)\b)"
    rf"|{_NUM}(?=-(?:character|word|line|sentence)))"
    r"(?P<rest>(?:[\s-]+[\w'-]+){0,4})",
    re.IGNORECASE,
)
_BARE_COUNT = re.compile(rf"(?:^\s*|\b(?:of|with|give|list|name|names|naming|gives|giving|lists|listing|contains?|has"
                         rf"|have)\s+){_NUM}\s+(?P<rest>(?:[\w'-]+\s*){{1,4}})", re.IGNORECASE)
_QUOTED = re.compile(r"\"([^\"]{1,80})\"|“([^”]{1,80})”|(?<![\w])'([^']{1,80})'(?![\w])|`([^`]{1,80})`")
_MENTIONS = re.compile(r"\b(?:mention(?:s|ing)?|includ(?:e|es|ing)|contain(?:s|ing)?|nam(?:e|es|ing)|us(?:e|es|ing)"
                       r"|cit(?:e|es|ing))\s+(?:the\s+(?:word|words|phrase|term|terms)\s+)?"
                       r"(?P<items>(?:\"[^\"]+\"|'[^']+'|`[^`]+`)(?:\s*(?:,|and|or)\s*(?:\"[^\"]+\"|'[^']+'|`[^`]+`))*)",
                       re.IGNORECASE)
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•]|\([a-z0-9]\))\s+", re.MULTILINE)
_JSON_WORDS = re.compile(r"\b(?:valid\s+)?JSON\s+(object|array)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Claim:
    """One checkable statement of a description: ``low <= measure(answer) <= high``, or a required phrase."""

    unit: str  # characters | words | lines | sentences | paragraphs | items | phrase | json
    low: int | None = None
    high: int | None = None
    phrase: str = ""
    source: str = ""
    wanted: str = ""  # what to ask for in a correction, in the description's words


def _number(text: str) -> int:
    text = text.lower().strip()
    return int(text) if text.isdigit() else _NUMBER_WORDS[text]


def _unit(rest: str) -> str:
    for word in re.findall(r"[\w]+", rest.lower())[:4]:
        if word in _UNITS:
            return _UNITS[word]
    return "items"


def _bounds(op: str, n: int) -> tuple[int | None, int | None]:
    op = " ".join(op.lower().split())
    if re.fullmatch(_AT_LEAST, op):
        return n, None
    if re.fullmatch(_AT_MOST, op):
        return None, n
    if re.fullmatch(_BELOW, op):
        return None, n - 1
    if re.fullmatch(_ABOVE, op):
        return n + 1, None
    return n, n  # exactly


def claims(description: str) -> list[Claim]:
    """The checkable claims of ``description`` (possibly none)."""
    out: list[Claim] = []
    taken: list[tuple[int, int]] = []
    for m in _COMPARED.finditer(description):
        nums = [g for g in m.groups() if g is not None and re.fullmatch(_NUM, g, re.IGNORECASE)]
        if not nums:
            continue
        rest = m.group("rest") or ""
        suffix = m.group("suffix")
        tail = description[m.end() - len(rest): m.end() + 40]
        unit = _unit(rest if not suffix else tail)
        if m.group("op"):
            low, high = _bounds(m.group("op"), _number(nums[0]))
        elif len(nums) >= 2:
            low, high = sorted((_number(nums[0]), _number(nums[1])))
        elif suffix:
            n = _number(nums[0])
            low, high = (None, n) if suffix.lower() in ("fewer", "less", "shorter") else (n, None)
        else:
            low, high = None, _number(nums[0])  # "a 60-character headline": a limit
        noun = " ".join(rest.split())
        wanted = f"{nums[0]} {noun}" if unit == "items" and noun else ""
        out.append(Claim(unit, low, high, source=m.group(0).strip(), wanted=wanted))
        taken.append(m.span())
    for m in _BARE_COUNT.finditer(description):
        if any(a <= m.start(1) < b for a, b in taken):
            continue
        noun = " ".join(m.group("rest").split())
        out.append(Claim(_unit(noun), _number(m.group(1)), None, source=m.group(0).strip(),
                         wanted=f"{m.group(1)} {noun}"))
    for m in _MENTIONS.finditer(description):
        for q in _QUOTED.finditer(m.group("items")):
            phrase = next(g for g in q.groups() if g is not None)
            out.append(Claim("phrase", phrase=phrase, source=m.group(0).strip()))
    j = _JSON_WORDS.search(description)
    if j:
        out.append(Claim("json", phrase=j.group(1).lower(), source=j.group(0)))
    return out


def measure(answer: str, unit: str) -> int:
    """How many ``unit`` the answer has."""
    text = answer.strip()
    if unit == "characters":
        return len(text)
    if unit == "words":
        return len(text.split())
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if unit == "lines":
        return len(lines)
    if unit == "paragraphs":
        return len([p for p in re.split(r"\n\s*\n", text) if p.strip()])
    if unit == "sentences":
        return len([s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()])
    listed = len(_LIST_ITEM.findall(text))
    if listed:
        return listed
    if len(lines) > 1:
        return len(lines)
    return len([p for p in re.split(r"[;,]", text) if p.strip()])


def check_answer(description: str, answer: str) -> tuple[list[str], list[str]]:
    """(reasons it fails, corrections) for ``answer`` against ``description``; both empty when it passes."""
    reasons: list[str] = []
    corrections: list[str] = []
    for claim in claims(description):
        if claim.unit == "phrase":
            if claim.phrase.lower() not in answer.lower():
                reasons.append(f"The answer does not mention {claim.phrase!r}, which the spec requires.")
                corrections.append(f"Mention {claim.phrase!r}.")
            continue
        if claim.unit == "json":
            try:
                value = json.loads(answer)
            except ValueError:
                value = None
            kind = dict if claim.phrase == "object" else list
            if not isinstance(value, kind):
                reasons.append(f"The answer is not a JSON {claim.phrase}, which the spec asks for.")
                corrections.append(f"Answer with a JSON {claim.phrase} only.")
            continue
        got = measure(answer, claim.unit)
        unit = claim.unit[:-1] if got == 1 else claim.unit
        if claim.low is not None and got < claim.low:
            reasons.append(f"The answer has {got} {unit}; the spec asks for {claim.source!r}.")
            corrections.append(f"Give at least {claim.wanted or f'{claim.low} {claim.unit}'}.")
        if claim.high is not None and got > claim.high:
            reasons.append(f"The answer has {got} {unit}; the spec asks for {claim.source!r}.")
            corrections.append(f"Shorten it to at most {claim.high} {claim.unit}.")
    return reasons, corrections
