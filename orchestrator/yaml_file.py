"""Reading the YAML files users write (jobs, fleet manifests), bounded, with errors that name the file.

A job file may come from anyone, so loading one must not cost more than its size suggests. Plain
``yaml.safe_load`` shares aliased nodes, which is cheap until the data is walked: a 677-byte file
of nested aliases ("billion laughs") expands to a billion values, and took 3 GB before it was
killed. Here the file's size, its nesting depth and the number of values it expands to (aliases
counted every time they are used) are bounded before the document is handed out, and recursive
aliases are refused; what is built meanwhile is only what the file writes out (aliases are shared).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from typing import Any, Protocol

import yaml

__all__ = ("MAX_YAML_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_VALUES", "load_bounded_yaml", "read_yaml")

MAX_YAML_BYTES = 64 * 1024 * 1024  # a job of 100,000 tasks is about 22 MB
MAX_YAML_DEPTH = 100  # containers inside containers, aliases expanded
# Values once aliases are expanded (scalars, sequences and mappings, keys included): at most this many,
# or, for a big file, at most ALIAS_GROWTH times the values written in it. The file's size bounds what
# is written; this bounds what aliases can add to it.
MAX_YAML_VALUES = 1_000_000
ALIAS_GROWTH = 4


class YAMLTooLarge(yaml.YAMLError):
    """A document over one of the bounds; the message says which, to follow "the file"."""


class _SourcedError(Protocol):
    def __call__(self, message: str, /, *, source: str | None = None) -> BaseException: ...


def read_yaml(path: str | os.PathLike[str], error: _SourcedError, *, what: str) -> Any:
    """The parsed document at ``path``; an unreadable, oversized or bad file raises ``error`` naming the file."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}", source=source) from exc
    if len(raw) > MAX_YAML_BYTES:
        raise error(f"{what} is larger than {MAX_YAML_BYTES} bytes", source=source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid UTF-8: byte {exc.start} ({raw[exc.start:exc.start + 1]!r}) "
                    f"{exc.reason}", source=source) from exc
    try:
        return load_bounded_yaml(text)
    except YAMLTooLarge as exc:
        raise error(f"{what} {exc}", source=source) from exc
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a scalar YAML parses but Python refuses (a huge int)
        raise error(f"not valid YAML: {exc}", source=source) from exc


def load_bounded_yaml(text: str) -> Any:
    """``yaml.safe_load`` with the bounds above; YAMLTooLarge (a YAMLError) when a bound is crossed.

    Built straight from the parser's events, checking the bounds as it goes: PyYAML's own loader first
    composes a node graph of the whole document (about 6 KB a task for a big job file, and most of its
    time), then builds the data from it. Aliases are shared, not copied, as ``safe_load`` shares them;
    their expanded size is counted. Tags beyond the JSON-like ones (``!!set``, ``!!omap``, ``!!pairs``,
    application tags) are refused: no job or manifest uses them.
    """
    loader = _LOADER(text)
    try:
        return _Builder(loader).document()
    except YAMLTooLarge:
        raise
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own limit (1,000), met while scanning ahead
            raise YAMLTooLarge(f"nests deeper than {MAX_YAML_DEPTH} levels") from exc
        raise
    finally:
        loader.dispose()


# libyaml's parser when PyYAML was built with it (several times faster); the same events either way.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TAG = "tag:yaml.org,2002:"
_STR, _MAP, _SEQ, _MERGE, _VALUE = (_TAG + t for t in ("str", "map", "seq", "merge", "value"))
_SCALAR_TAGS = frozenset(_TAG + t for t in ("null", "bool", "int", "float", "binary", "timestamp"))
_MERGE_KEY = object()  # what a ``<<`` key builds: its value is merged into the mapping, not stored
_NO_KEY = object()  # a mapping waiting for its next key


class _Open:
    """A collection being built: its value so far, and what the bounds need to know about it."""

    __slots__ = ("anchor", "depth", "is_map", "key", "mark", "merges", "size", "value")

    def __init__(self, is_map: bool, anchor: str | None, mark: Any) -> None:
        self.is_map = is_map
        self.anchor = anchor
        self.mark = mark
        self.value: Any = {} if is_map else []
        self.key: Any = _NO_KEY
        self.merges: list[dict[Any, Any]] = []  # as they appear; the first to give a key wins
        self.size = 1  # values once aliases are expanded, this one included
        self.depth = 0  # the deepest child's nesting, aliases expanded


class _Builder:
    """Builds one document from parser events, with the bounds of this module checked on the way."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.anchors: dict[str, tuple[Any, int, int]] = {}  # anchor -> (value, expanded size, depth)
        self.open_anchors: set[str] = set()
        self.written = 0  # values as written, each alias counted once
        # One object per distinct string: a generated job repeats its keys, capabilities, instructions and
        # often inputs in every task, and each occurrence was its own object (~50 bytes and up a time),
        # kept for the whole run by the records made from it. Strings are immutable: sharing is invisible.
        self.strings: dict[str, str] = {}

    def document(self) -> Any:
        loader = self.loader
        loader.get_event()  # stream start
        if loader.check_event(yaml.StreamEndEvent):
            loader.get_event()
            return None
        start: Any = loader.get_event()  # document start
        value, size, _ = self._value()
        if value is _MERGE_KEY:
            raise _unknown_tag(_MERGE, start)
        loader.get_event()  # document end
        if not loader.check_event(yaml.StreamEndEvent):
            another: Any = loader.get_event()
            raise yaml.composer.ComposerError("expected a single document in the stream", start.start_mark,
                                              "but found another document", another.start_mark)
        limit = max(MAX_YAML_VALUES, ALIAS_GROWTH * self.written)
        if size > limit:
            raise YAMLTooLarge(f"is too large: it expands to more than {limit} values (aliases count each time they "
                               f"are used)")
        return value

    def _value(self) -> tuple[Any, int, int]:
        """The next node's value, its size and its depth, aliases expanded (iteratively: no recursion)."""
        loader = self.loader
        stack: list[_Open] = []
        while True:
            event: Any = loader.get_event()
            if isinstance(event, yaml.AliasEvent):
                value, size, depth = self._alias(event)
            elif isinstance(event, yaml.ScalarEvent):
                self.written += 1
                value, size, depth = self._scalar(event), 1, 0
                self._define(event.anchor, event, (value, size, depth))
            elif isinstance(event, yaml.CollectionStartEvent):
                self.written += 1
                if len(stack) >= MAX_YAML_DEPTH:
                    raise YAMLTooLarge(f"nests deeper than {MAX_YAML_DEPTH} levels")
                is_map = isinstance(event, yaml.MappingStartEvent)
                if event.tag not in (None, "!", _MAP if is_map else _SEQ):
                    raise _unknown_tag(event.tag, event)
                self._define(event.anchor, event, None)
                stack.append(_Open(is_map, event.anchor, event.start_mark))
                continue
            else:  # the end of the innermost open collection
                done = stack.pop()
                value, size, depth = self._finish(done), done.size, 1 + done.depth
                if depth > MAX_YAML_DEPTH:
                    raise YAMLTooLarge(f"nests deeper than {MAX_YAML_DEPTH} levels once aliases are expanded")
                if done.anchor is not None:
                    self.open_anchors.discard(done.anchor)
                    self.anchors[done.anchor] = (value, size, depth)
            if not stack:
                return value, size, depth
            self._add(stack[-1], value, size, depth, event)

    def _define(self, anchor: str | None, event: Any, entry: tuple[Any, int, int] | None) -> None:
        if anchor is None:
            return
        if anchor in self.anchors or anchor in self.open_anchors:
            raise yaml.composer.ComposerError(None, None, f"found duplicate anchor {anchor!r}", event.start_mark)
        if entry is None:
            self.open_anchors.add(anchor)
        else:
            self.anchors[anchor] = entry

    def _alias(self, event: Any) -> tuple[Any, int, int]:
        if event.anchor in self.open_anchors:
            raise YAMLTooLarge("has an alias inside the collection it refers to (a recursive structure)")
        if event.anchor not in self.anchors:
            raise yaml.composer.ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
        return self.anchors[event.anchor]

    def _scalar(self, event: Any) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag in (_STR, _VALUE):  # "=" (the value key) is a plain string once safe_load has built it
            return self.strings.setdefault(event.value, event.value)
        if tag == _MERGE:
            return _MERGE_KEY
        if tag not in _SCALAR_TAGS:
            raise _unknown_tag(tag, event)
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        return self.loader.yaml_constructors[tag](self.loader, node)

    @staticmethod
    def _add(parent: _Open, value: Any, size: int, depth: int, event: Any) -> None:
        if value is _MERGE_KEY and not (parent.is_map and parent.key is _NO_KEY):
            raise _unknown_tag(_MERGE, event)
        parent.size += size
        parent.depth = max(parent.depth, depth)
        if not parent.is_map:
            parent.value.append(value)
        elif parent.key is _NO_KEY:
            if not isinstance(value, Hashable):
                raise yaml.constructor.ConstructorError("while constructing a mapping", parent.mark,
                                                        "found unhashable key", event.start_mark)
            parent.key = value
        else:
            if parent.key is _MERGE_KEY:
                parent.merges.extend(_mergeable(value, parent.mark, event.start_mark))
            else:
                parent.value[parent.key] = value
            parent.key = _NO_KEY

    @staticmethod
    def _finish(done: _Open) -> Any:
        if not done.merges:
            return done.value
        merged: dict[Any, Any] = {}
        for source in done.merges:
            for key, value in source.items():
                merged.setdefault(key, value)
        merged.update(done.value)  # the mapping's own keys win over merged ones
        return merged


def _unknown_tag(tag: str, event: Any) -> yaml.YAMLError:
    return yaml.constructor.ConstructorError(None, None, f"could not determine a constructor for the tag {tag!r}",
                                             event.start_mark)


def _mergeable(value: Any, mark: Any, at: Any) -> list[dict[Any, Any]]:
    """What a ``<<`` merges: a mapping, or a list of mappings (the first to give a key wins)."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    raise yaml.constructor.ConstructorError("while constructing a mapping", mark,
                                            "expected a mapping or list of mappings for merging", at)
