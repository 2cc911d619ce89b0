"""The bounded YAML loader builds what ``yaml.safe_load`` builds, from the parser's events.

It replaced PyYAML's compose-then-construct loader (a node graph of the whole document: about 6 KB a
task for a big job file); the attacks it bounds are in tests/security/test_yaml_attacks.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import yaml_file
from orchestrator.yaml_file import load_bounded_yaml
from tests.integration.harness import ROOT

SAME_AS_SAFE_LOAD = [
    "",
    "a: 1",
    "- 1\n- 2.5\n- true\n- null\n- ~\n- 0x1F\n- 1_000\n- '01'\n- 2024-01-01\n- 2024-01-01T10:00:00Z\n- !!str 12\n"
    "- !!binary aGVsbG8=\n- .inf\n- 0o17\n- 1:30\n- !!int '7'\n- !!float '7'\n- !!null ''\n",
    "k:\n",
    "'=': 1\n=: 2\n",
    '"<<": 5\n',
    "? [1, 2]\n: v\n",
    "a: {b: [1, {c: d}], e: 'f'}\n",
    "!!map {a: 1}",
    "!!seq [1]",
    "a: &x 5\nb: *x\nc: [*x, *x]\n",
    "base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\n",
    "a: &a {p: 1, q: 1}\nb: &b {p: 2, r: 2}\nc:\n  <<: [*a, *b]\n  s: 3\nd: {<<: [*b, *a], p: 9}\n",
    "a: &a\n  - {x: 1}\n  - {y: 2}\nb: {<<: *a}\n",
    # Refused by both: what each says may differ, that they refuse may not.
    "a: [1, 2]\nb: {<<: 3}\n",
    "a: !custom 1\n",
    "a: *nope\n",
    "a: &x 1\nb: &x 2\n",
    "--- 1\n--- 2\n",
    "x: <<\n",
    "- <<\n",
    "{[1]: 2}\n",
    "a: [1\n",
]


def _files() -> list[Path]:
    return sorted(p for d in ("examples", "deploy") for p in (ROOT / d).rglob("*.y*ml"))


def _outcome(load: Any, text: str) -> tuple[str, Any]:
    try:
        value = load(text)
    except yaml.YAMLError:
        return "refused", None  # that both refuse matters, not how each words it
    return "built", (value, list(value) if isinstance(value, dict) else None)  # key order too


@pytest.fixture(params=["libyaml", "pure-python"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "libyaml":
        if not hasattr(yaml, "CSafeLoader"):
            pytest.skip("PyYAML was built without libyaml")
        monkeypatch.setattr(yaml_file, "_LOADER", yaml.CSafeLoader)
    else:
        monkeypatch.setattr(yaml_file, "_LOADER", yaml.SafeLoader)
    return str(request.param)


@pytest.mark.parametrize("text", SAME_AS_SAFE_LOAD)
def test_builds_what_safe_load_builds(loader: str, text: str) -> None:
    assert _outcome(load_bounded_yaml, text) == _outcome(yaml.safe_load, text)


def test_every_shipped_job_and_manifest_loads_as_safe_load_loads_it(loader: str) -> None:
    files = _files()
    assert len(files) >= 5
    for path in files:
        text = path.read_text()
        assert _outcome(load_bounded_yaml, text) == _outcome(yaml.safe_load, text), path


def test_aliases_are_shared_not_copied(loader: str) -> None:
    data = load_bounded_yaml("a: &a {x: [1, 2]}\nb: *a\n")
    assert data["b"] is data["a"]  # as safe_load shares them; the expansion is what the bounds count


def test_equal_strings_are_one_object(loader: str) -> None:
    # A generated job repeats its keys and values in every task; the run keeps what its records hold.
    data = load_bounded_yaml("- {capability: summarise, input: a long shared text}\n"
                             "- {capability: summarise, input: a long shared text}\n")
    first, second = data
    assert first["input"] is second["input"]
    assert first["capability"] is second["capability"]
    assert next(iter(first)) is next(iter(second))  # keys too


def test_merged_mappings_earlier_in_the_list_win_as_the_merge_key_spec_says(loader: str) -> None:
    # PyYAML 6.0.4's safe_load agrees only for keys CPython caches as one object (single letters, as in
    # the list above): it drops repeated keys by the identity of their strings, so for "port" the last
    # mapping wins. Two "<<" keys in one mapping (duplicate keys) merge the same way as a list here.
    text = "a: &a {port: 1}\nb: &b {port: 2, r: 2}\nc: {<<: [*a, *b]}\nd: {<<: *a, <<: *b}\n"
    data = load_bounded_yaml(text)
    assert data["c"] == data["d"] == {"port": 1, "r": 2}


@pytest.mark.parametrize("tag", ["!!set {x, y}", "!!omap [{a: 1}]", "!!pairs [{a: 1}]"])
def test_collection_tags_beyond_json_are_refused_with_the_tag_named(loader: str, tag: str) -> None:
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor for the tag"):
        load_bounded_yaml(f"a: {tag}\n")


def test_a_big_job_file_is_built_without_a_node_graph(loader: str) -> None:
    # The node graph safe_load composes first holds marks and tags for every value; building from
    # events holds the data and the open collections only. Compared through tracemalloc's peak.
    import tracemalloc

    text = "goal: big\ntasks:\n" + "".join(
        f"  - id: t{i}\n    capability: noop\n    instruction: noop\n    input: {'x' * 64}\n"
        f"    spec: {{expect: {'x' * 64}}}\n" for i in range(5000))
    peaks = {}
    for name, load in (("events", load_bounded_yaml), ("safe_load", lambda t: yaml.load(t, Loader=yaml_file._LOADER))):
        tracemalloc.start()
        data = load(text)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(data["tasks"]) == 5000
    assert peaks["events"] * 2 < peaks["safe_load"], peaks
