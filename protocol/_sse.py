"""Server-sent events as vLLM sends them: ``data: <json>`` lines, blank-line separated, no ``event:``."""

from __future__ import annotations

from collections.abc import AsyncIterator

__all__ = ("EventTooLarge", "iter_sse_data")


class EventTooLarge(Exception):
    """A line of the stream grew past the limit without ending: a server that is not sending events."""


async def iter_sse_data(chunks: AsyncIterator[bytes], *, max_line_bytes: int) -> AsyncIterator[str]:
    """Yield the data of each event; multi-line data is joined with newlines, comments are skipped.

    Lines are split here from the raw bytes, so what is held at once is bounded by ``max_line_bytes``
    (a line read whole by the HTTP client grows as long as the server keeps sending).
    """
    data: list[str] = []
    pending: list[bytes] = []  # the start of a line still arriving, in the pieces it came in
    held = 0
    async for chunk in chunks:
        *lines, rest = chunk.split(b"\n")  # only the new bytes are scanned: a long line costs its length once
        if lines:
            lines[0] = b"".join(pending) + lines[0]
            pending, held = [], 0
        if rest:
            pending.append(rest)
            held += len(rest)
            if held > max_line_bytes:
                raise EventTooLarge(f"a line of the stream is longer than {max_line_bytes} bytes")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", "replace")
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value.removeprefix(" "))
    if last := b"".join(pending).strip():
        field, _, value = last.decode("utf-8", "replace").partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)
