"""An example worker plugin: ``slugify`` turns a title into a URL slug, and verifies its own output."""

from __future__ import annotations

import re
import unicodedata

from pydantic import BaseModel

from workers import Task, Verdict, Worker

__all__ = ("SlugifyConfig", "SlugifyWorker")


class SlugifyConfig(BaseModel):
    """Settings a job or manifest can give the worker."""

    max_length: int = 40
    separator: str = "-"


class SlugifyWorker(Worker):
    """Turns ``task.input`` (a title) into a lowercase ASCII slug."""

    capability = "slugify"
    config_model = SlugifyConfig
    config: SlugifyConfig

    async def handle(self, task: Task) -> str:
        ascii_title = unicodedata.normalize("NFKD", str(task.input)).encode("ascii", "ignore").decode()
        words = re.findall(r"[a-z0-9]+", ascii_title.lower())
        config: SlugifyConfig = self.config_for(task)  # the worker's config with the task's config: merged over it
        slug = config.separator.join(words)
        return slug[: config.max_length].rstrip(config.separator)

    async def verify(self, task: Task, output: object) -> Verdict:
        ok = isinstance(output, str) and bool(re.fullmatch(r"[a-z0-9]+(?:[-_][a-z0-9]+)*", output))
        return Verdict(passed=ok, feedback="" if ok else f"{output!r} is not a slug")
