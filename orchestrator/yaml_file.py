"""Reading the YAML files users write (jobs, fleet manifests), bounded, with errors that name the file.

A job file may come from anyone, so loading one must not cost more than its size suggests. Plain
``yaml.safe_load`` shares aliased nodes, which is cheap until the data is walked: a 677-byte file
of nested aliases ("billion laughs") expands to a billion values, and took 3 GB before it was
killed. Here the file's size, its nesting depth and the number of values it expands to (aliases
counted every time they are used) are bounded before anything is built, and recursive aliases
are refused.
"""

from __future__ import annotations

import os
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
    """``yaml.safe_load`` with the bounds above; YAMLTooLarge (a YAMLError) when a bound is crossed."""
    if _C_LOADER is not None:
        return _load_with_libyaml(text, _C_LOADER)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# libyaml's safe loader, when PyYAML was built with it: about 10x faster on a job of 100,000 tasks.
_C_LOADER: Any = getattr(yaml, "CSafeLoader", None)


def _load_with_libyaml(text: str, loader_class: Any) -> Any:
    """The same bounds with libyaml: nesting checked on the event stream before its (recursive) composer runs."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=loader_class):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise YAMLTooLarge(f"nests deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own limit (1,000), met while scanning ahead
            raise YAMLTooLarge(f"nests deeper than {MAX_YAML_DEPTH} levels") from exc
        raise
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that stops composing past the depth bound and checks the expanded size before building."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # The composer recurses once per level: stop long before Python's recursion limit does.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH + 1:  # the values inside the deepest container are one more
                raise YAMLTooLarge(f"nests deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node: yaml.Node | None = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Count values and depth as if every alias were copied out, without copying (each node once, iteratively)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in size:
            continue
        kids = _children(node)
        if not children_done:
            if key in on_path:
                raise YAMLTooLarge("has an alias inside the collection it refers to (a recursive structure)")
            on_path.add(key)
            stack.append((node, True))
            for kid in kids:
                if id(kid) in on_path:
                    raise YAMLTooLarge("has an alias inside the collection it refers to (a recursive structure)")
                if id(kid) not in size:
                    stack.append((kid, False))
            continue
        on_path.discard(key)
        size[key] = 1 + sum(size[id(k)] for k in kids)  # counted, never built: big ints cost nothing here
        depth[key] = 0 if isinstance(node, yaml.ScalarNode) else 1 + max((depth[id(k)] for k in kids), default=0)
        if depth[key] > MAX_YAML_DEPTH:
            raise YAMLTooLarge(f"nests deeper than {MAX_YAML_DEPTH} levels once aliases are expanded")
    limit = max(MAX_YAML_VALUES, ALIAS_GROWTH * len(size))  # len(size): the values written, each once
    if size[id(root)] > limit:
        raise YAMLTooLarge(f"is too large: it expands to more than {limit} values (aliases count each time they "
                           f"are used)")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
