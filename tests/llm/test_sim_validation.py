"""vLLM 0.33's request validation as the simulator answers it over HTTP: status, envelope, type and param."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import jsonschema
import pytest

from orchestrator.simulator import SimulatedVLLM

HELLO = [{"role": "user", "content": "hello"}]
TOO_BIG = 2**63


async def _post(sim: SimulatedVLLM, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        return await http.post(path, json=body)


@pytest.mark.parametrize(
    ("path", "body", "type_", "param", "fragment"),
    [
        ("/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"json": {"type": "nope"}}},
         "BadRequestError", "structured_outputs", "Failed to transform json schema into a grammar"),
        ("/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"json": "{not json"}},
         "BadRequestError", "structured_outputs", "Invalid JSON grammar specification."),
        ("/v1/chat/completions", {"messages": HELLO, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "a"}}}},
         "BadRequestError", "response_format", "Failed to transform json schema"),
        ("/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"regex": "a(b"}},
         "BadRequestError", "structured_outputs", "Failed to transform regex into a grammar"),
        ("/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"grammar": "root ::= item\n"}},
         "BadRequestError", "structured_outputs", "Invalid grammar specification."),
        ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"abc": 1.0}},
         "BadRequestError", "logit_bias", "cannot be converted to integer token IDs"),
        ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"99999999": 1.0}},
         "BadRequestError", "logit_bias", "out-of-vocab token ids"),
        ("/v1/chat/completions", {"messages": HELLO, "seed": TOO_BIG},
         "Bad Request", "body.seed", "less than or equal to 9223372036854775807"),
        ("/v1/chat/completions", {"messages": HELLO, "seed": -TOO_BIG - 1},
         "Bad Request", "body.seed", "greater than or equal to"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21},
         "BadRequestError", "logprobs", "Requested sample logprobs of 21, which is greater than max allowed: 20"),
        ("/v1/completions", {"prompt": ""}, "BadRequestError", "prompt", "Either prompt or prompt_embeds"),
        ("/v1/completions", {}, "BadRequestError", "prompt", "Either prompt or prompt_embeds"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, "BadRequestError", "prompt", "Token id 1000000000 is out"),
        ("/v1/completions", {"prompt": [[5], [-1]]}, "BadRequestError", "prompt", "Token id -1 is out"),
        ("/v1/completions", {"prompt": [[5], []]}, "BadRequestError", None, "prompt cannot be empty"),
        ("/v1/completions", {"prompt": ["a"] * 1025}, "BadRequestError", "prompt", "exceeds the maximum allowed count"),
        ("/v1/chat/completions", {"messages": HELLO, "n": 16385}, "BadRequestError", "n", "n must be at most 16384"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "BadRequestError", "min_tokens",
         "min_tokens must be less than or equal to max_tokens=4"),
        ("/v1/chat/completions", {"messages": HELLO, "n": 2, "temperature": 0}, "BadRequestError", "n",
         "n must be 1 when using greedy sampling"),
        ("/v1/chat/completions", {"messages": HELLO, "stop": ["x", ""]}, "BadRequestError", "stop",
         "stop cannot contain an empty string"),
        ("/v1/completions", {"prompt": "hi", "stream": True, "prompt_logprobs": 1}, "BadRequestError",
         "prompt_logprobs", "not available when `stream=True`"),
    ],
)
async def test_vllm_400s(sim_llm: SimulatedVLLM, path: str, body: dict[str, Any], type_: str, param: str | None,
                         fragment: str) -> None:
    r = await _post(sim_llm, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == (type_, param, 400)
    assert fragment in err["message"]


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {"allOf": [{"$ref": "#"}]},
        {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
    ],
)
async def test_recursive_schema_is_refused_quickly(sim_llm: SimulatedVLLM, schema: dict[str, Any]) -> None:
    with anyio.fail_after(2):
        r = await _post(sim_llm, "/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"json": schema}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "structured_outputs"


async def test_deep_and_huge_schemas_are_refused_quickly(sim_llm: SimulatedVLLM) -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(80):
        deep = {"type": "array", "items": deep}
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                             for i in range(4000)}}
    with anyio.fail_after(5):
        for schema, fragment in ((deep, "nested too deeply"), (huge, "larger than")):
            r = await _post(sim_llm, "/v1/chat/completions",
                            {"messages": HELLO, "structured_outputs": {"json": schema}})
            assert r.status_code == 400
            assert fragment in r.json()["error"]["message"]


async def test_legitimately_recursive_schema_is_served(sim_llm: SimulatedVLLM) -> None:
    tree = {"type": "object", "properties": {"name": {"type": "string"},
                                             "children": {"type": "array", "items": {"$ref": "#"}}},
            "required": ["name"]}
    r = await _post(sim_llm, "/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"json": tree}})
    assert r.status_code == 200
    assert "name" in r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "no finite value"),
        ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "no finite value"),
        ({"anyOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"type": "array", "items": {"$ref": "#"}, "minItems": 2}}},
         "no finite value"),
        ({"$defs": {**{f"d{i}": {"oneOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(30)},
                    "d30": {"type": "string"}}, "$ref": "#/$defs/d0"}, "more than 4000 subschemas"),
    ],
)
async def test_schemas_without_a_finite_or_affordable_value_are_refused(sim_llm: SimulatedVLLM,
                                                                        schema: dict[str, Any], fragment: str) -> None:
    with anyio.fail_after(10):
        r = await _post(sim_llm, "/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"json": schema}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "BadRequestError"
    assert fragment in r.json()["error"]["message"]


async def test_recursion_with_a_way_out_is_served_a_valid_value(sim_llm: SimulatedVLLM) -> None:
    schema = {"anyOf": [{"type": "array", "items": {"$ref": "#"}, "minItems": 2}, {"type": "integer", "minimum": 7}]}
    r = await _post(sim_llm, "/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"json": schema}})
    assert r.status_code == 200, r.text
    value = json.loads(r.json()["choices"][0]["message"]["content"])
    jsonschema.validate(value, schema)  # the first alternative, whose items take the way out: [7, 7]
    assert value == [7, 7]


async def test_a_minimal_value_longer_than_max_tokens_is_cut_there(sim_llm: SimulatedVLLM) -> None:
    schema = {"type": "object", "required": ["s"], "properties": {"s": {"type": "string", "minLength": 10**9}}}
    with anyio.fail_after(10):
        r = await _post(sim_llm, "/v1/chat/completions",
                        {"messages": HELLO, "max_tokens": 20, "structured_outputs": {"json": schema}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith('{"s": "xxxx')
    assert r.json()["usage"]["completion_tokens"] == 20


async def test_regex_bounds(sim_llm: SimulatedVLLM) -> None:
    for regex, fragment in (("a" * 70_000, "longer than"), ("(" * 5000 + ")" * 5000, "nests too deeply")):
        r = await _post(sim_llm, "/v1/chat/completions", {"messages": HELLO, "structured_outputs": {"regex": regex}})
        assert r.status_code == 400, r.text
        assert fragment in r.json()["error"]["message"]


async def test_valid_grammar_and_regex_are_served(sim_llm: SimulatedVLLM) -> None:
    for so in ({"grammar": 'root ::= "yes" | "no"'}, {"regex": r"\d{3}"}, {"grammar": 'start: "a" | "b"'}):
        r = await _post(sim_llm, "/v1/chat/completions", {"messages": HELLO, "structured_outputs": so})
        assert r.status_code == 200, (so, r.text)


async def test_non_json_content_type_400(sim_llm: SimulatedVLLM) -> None:
    async with httpx.AsyncClient(base_url=sim_llm.url) as http:
        r = await http.post("/v1/chat/completions", content=b'{"messages": []}',
                            headers={"content-type": "text/plain"})
        ok = await http.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "x"}]}',
                             headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "Bad Request"
    assert "Only 'application/json' is allowed" in err["message"]
    assert ok.status_code == 200


async def test_stream_options_without_stream_rules(sim_llm: SimulatedVLLM) -> None:
    empty = await _post(sim_llm, "/v1/chat/completions", {"messages": HELLO, "stream_options": {}})
    assert empty.status_code == 200  # vLLM only refuses a non-empty stream_options without stream
    r = await _post(sim_llm, "/v1/chat/completions", {"messages": HELLO, "stream_options": {"include_usage": True}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "stream_options"
