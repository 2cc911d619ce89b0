"""Server-sent events as vLLM sends them: ``data: <json>`` lines, blank-line separated, no ``event:``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

__all__ = ("iter_sse_data",)


async def iter_sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """Yield the data of each event; multi-line data is joined with newlines, comments are skipped."""
    data: list[str] = []
    async for line in response.aiter_lines():
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
    if data:
        yield "\n".join(data)
