"""Routes, validation and response shapes of vLLM's OpenAI-compatible server, on top of the engine."""

from __future__ import annotations

import functools
import hmac
import json
import os
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import structlog
from pydantic import ValidationError

from ._http import Request, Response, StreamingResponse, json_response
from .config import SIM_VERSION, SYSTEM_FINGERPRINT, FaultRates, SimConfig
from .engine import Engine, EngineDead
from .faults import FAULTS, Fault, FaultInjector
from .metrics import render_metrics
from .policy import Policy, SimRequest
from .sampling import Choice, GenParams, chat_logprobs, completion_logprobs, prompt_logprobs
from .stats import SimStats
from .structured import MAX_ANSWER_CHARS, conform
from .tokenizer import Tokenizer
from .validation import (
    INT64_MAX,
    INT64_MIN,
    HttpError,
    bad,
    check_grammar,
    check_json_schema,
    check_regex,
    checked_json_schema,
    pydantic_error,
)

__all__ = ("SimApp",)

log = structlog.get_logger(__name__)

_GUARDED = ("/v1", "/v2", "/inference", "/cohere", "/_sim/")
_SIM_HEADERS = [("x-simulated", "true")]
_KNOWN_CHAT = frozenset({
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream", "stream_options",
    "temperature", "top_p", "tools", "tool_choice", "parallel_tool_calls", "user", "top_k", "min_p",
    "repetition_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "prompt_logprobs", "structured_outputs", "priority", "request_id", "session_id", "cache_salt",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "echo", "documents", "chat_template",
    "include_reasoning", "reasoning_effort", "return_token_ids", "skip_special_tokens", "truncate_prompt_tokens",
    "bad_words", "allowed_token_ids", "spaces_between_special_tokens", "vllm_xargs", "kv_transfer_params",
    "metadata", "store", "service_tier", "prompt", "suffix", "best_of", "return_tokens_as_token_ids",
    "truncation_side", "add_special_tokens", "logprob_token_ids", "stream_interval", "thinking_token_budget",
    "repetition_detection", "use_beam_search", "length_penalty", "watermarking", "prompt_embeds",
    "mm_processor_kwargs", "ec_transfer_params", "return_token_offsets",
})


_bad = bad
_MAX_N = int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))  # vLLM's bounds, from the same variables
_MAX_PROMPTS = int(os.environ.get("VLLM_MAX_COMPLETION_PROMPTS", "1024"))
_JSON_ONLY = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/invocations"})
_RESPONSES_KNOWN = frozenset({"input", "instructions", "model", "max_output_tokens", "stream", "temperature", "top_p",
                              "text", "store", "metadata", "previous_response_id", "reasoning", "tools",
                              "tool_choice", "parallel_tool_calls", "user", "include", "truncation",
                              "service_tier", "background", "request_id", "priority", "cache_salt"})


def _validation(message: str, param: str) -> HttpError:
    return HttpError(400, f"1 validation error:\n  {message}", "Bad Request", param)


class SimApp:
    """The request handler; one per simulated server."""

    def __init__(self, config: SimConfig, engine: Engine, stats: SimStats, policy: Policy) -> None:
        self.config = config
        self.engine = engine
        self.stats = stats
        self.policy = policy
        self.tokenizer = Tokenizer(config.vocab_size)
        self.faults = FaultInjector(config.faults, config.seed)
        self._schema_threads = anyio.CapacityLimiter(2)
        self._routes = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/ping"): self._health,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/version"): self._version,
            ("GET", "/load"): self._load,
            ("POST", "/tokenize"): self._tokenize,
            ("POST", "/detokenize"): self._detokenize,
            ("GET", "/tokenizer_info"): self._tokenizer_info,
            ("POST", "/invocations"): self._invocations,
            ("POST", "/ping"): self._health,
            ("GET", "/openapi.json"): self._openapi,
            ("POST", "/v1/responses"): self._responses,
        }
        if config.server_dev_mode:  # vLLM routes its dev endpoints only with VLLM_SERVER_DEV_MODE=1
            self._routes[("POST", "/reset_prefix_cache")] = self._reset_cache
        if config.sim_admin:  # test control and introspection: off unless asked for, never without the key
            self._routes[("GET", "/_sim/state")] = self._state
            self._routes[("POST", "/_sim/faults")] = self._set_faults

    async def __call__(self, req: Request) -> Response | StreamingResponse:
        """Route one request, with vLLM's auth rule and the simulator's marker header."""
        root = self.config.root_path.rstrip("/")
        if root and (req.path == root or req.path.startswith(root + "/")):
            req.path = req.path[len(root):] or "/"  # served under a proxy's prefix, and at the bare path too
        known = any(path == req.path for _, path in self._routes)
        self.stats.requests_by_endpoint[req.path if known else "<other>"] += 1  # a client's paths must not grow it
        response = await self._dispatch(req)
        response.headers.extend(_SIM_HEADERS)
        if self.config.enable_request_id_headers:
            response.headers.append(("x-request-id", req.headers.get("x-request-id") or uuid.uuid4().hex))
        self.stats.requests_by_status[response.status] += 1
        return response

    async def _dispatch(self, req: Request) -> Response | StreamingResponse:
        if self.config.api_keys and req.method != "OPTIONS" and req.path.startswith(_GUARDED):
            scheme, _, token = req.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(
                hmac.compare_digest(token.encode(), k.encode()) for k in self.config.api_keys
            ):
                return json_response(401, {"error": "Unauthorized"})
        handler = self._routes.get((req.method, req.path))
        if handler is None:
            if any(path == req.path for _, path in self._routes):
                return json_response(405, {"detail": "Method Not Allowed"})
            return json_response(404, {"detail": "Not Found"})
        try:
            if req.method == "POST" and req.path in _JSON_ONLY:
                media = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if media != "application/json":
                    raise HttpError(400, "1 validation error:\n  Unsupported Media Type: Only 'application/json' "
                                    "is allowed", "Bad Request")
            return await handler(req)
        except HttpError as exc:
            return exc.response

    # -- plain endpoints --------------------------------------------------------------------------

    async def _models(self, req: Request) -> Response:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": self.config.model,
             "parent": None, "max_model_len": self.config.max_model_len,
             "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                             "created": created, "allow_create_engine": False, "allow_sampling": True,
                             "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                             "allow_fine_tuning": False, "organization": "*", "group": None,
                             "is_blocking": False}]}
            for name in self.config.served_model_names
        ]
        return json_response(200, {"object": "list", "data": data})

    async def _health(self, req: Request) -> Response:
        return Response(503 if self.engine.dead else 200, b"")

    async def _metrics(self, req: Request) -> Response:
        body = render_metrics(self.config, self.engine, self.stats).encode()
        return Response(200, body, content_type="text/plain; version=0.0.4; charset=utf-8")

    async def _version(self, req: Request) -> Response:
        return json_response(200, {"version": SIM_VERSION, "simulated": True, "system_fingerprint": SYSTEM_FINGERPRINT})

    async def _load(self, req: Request) -> Response:
        return json_response(200, {"server_load": len(self.engine.running) + len(self.engine.waiting)})

    async def _state(self, req: Request) -> Response:
        config = self.config.model_dump(mode="json")
        config["api_keys"] = ["<redacted>"] * len(self.config.api_keys)  # the state is for tests, not for secrets
        return json_response(200, {**self.stats.snapshot(), **self.engine.state(), "config": config})

    async def _set_faults(self, req: Request) -> Response:
        body = self._json(req)
        try:
            rates = FaultRates.model_validate(body["rates"]) if "rates" in body else None
        except ValidationError as exc:
            raise _bad(f"/_sim/faults: bad rates: {exc}", "rates") from exc
        script = body.get("script", [])
        bad_faults = [f for f in script if f is not None and f not in FAULTS] if isinstance(script, list) else script
        if bad_faults or not isinstance(script, list):  # all checked before anything changes
            raise _bad(f"/_sim/faults: script must list fault names from {FAULTS} (or null), got {bad_faults!r}",
                       "script")
        if rates is not None:
            self.faults.set_rates(rates)
        self.faults.script(script)
        if body.get("engine") == "dead":
            self.engine.kill()
        elif body.get("engine") == "alive":
            self.engine.revive()
        return json_response(200, {"ok": True})

    async def _reset_cache(self, req: Request) -> Response:
        self.engine.reset_prefix_cache()
        return Response(200, b"")

    async def _tokenize(self, req: Request) -> Response:
        body = self._json(req)
        self._check_model(body)
        if "messages" in body:
            prompt = self._render(self._messages(body), body.get("tools"), body.get("add_generation_prompt", True))
        elif isinstance(body.get("prompt"), str):
            prompt = body["prompt"]
        else:
            raise _validation("Field required [type=missing]", "body.prompt")
        tokens = self.tokenizer.encode(prompt)
        strs = [self.tokenizer.decode([t]) for t in tokens] if body.get("return_token_strs") else None
        return json_response(200, {"count": len(tokens), "max_model_len": self.config.max_model_len,
                                   "tokens": tokens, "token_strs": strs})

    async def _tokenizer_info(self, req: Request) -> Response:
        if not self.config.enable_tokenizer_info_endpoint:  # vLLM only routes it with the flag
            return json_response(404, {"detail": "Not Found"})
        return json_response(200, {"tokenizer_class": "SimulatedTokenizer", "model_max_length": self.config.max_model_len,
                                   "vocab_size": self.config.vocab_size, "simulated": True,
                                   "chat_template": "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n"
                                                    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                                                    "{% endif %}"})

    async def _invocations(self, req: Request) -> Response | StreamingResponse:
        """SageMaker's entry point: the body's shape picks chat, completions or responses, as in vLLM."""
        body = self._json(req)
        if "messages" in body:
            return await self._generate(req, chat=True)
        if "prompt" in body:
            return await self._generate(req, chat=False)
        if "input" in body:
            return await self._responses(req)
        raise _bad("Cannot find suitable handler for request. Expected one of: ['chat', 'completions', "
                   "'responses']")

    async def _openapi(self, req: Request) -> Response:
        paths: dict[str, dict[str, Any]] = {}
        for method, path in self._routes:
            if path.startswith("/_sim"):
                continue
            paths.setdefault(path, {})[method.lower()] = {"responses": {"200": {"description": "Successful Response"}}}
        doc: dict[str, Any] = {"openapi": "3.1.0", "info": {"title": "vLLM (simulated)", "version": SIM_VERSION},
                               "paths": paths}
        if self.config.root_path:
            doc["servers"] = [{"url": self.config.root_path}]
        return json_response(200, doc)

    async def _detokenize(self, req: Request) -> Response:
        body = self._json(req)
        self._check_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise _validation("Input should be a valid list of integers [type=list_type]", "body.tokens")
        return json_response(200, {"prompt": self.tokenizer.decode(tokens)})

    # -- request parsing --------------------------------------------------------------------------

    @staticmethod
    def _json(req: Request) -> dict[str, Any]:
        try:
            body = json.loads(req.body or b"{}")
        except ValueError as exc:
            raise _validation(f"JSON decode error: {exc}", "body") from exc
        except RecursionError as exc:
            raise _validation("JSON decode error: the body nests too deeply", "body") from exc
        if not isinstance(body, dict):
            raise _validation("Input should be a valid dictionary [type=dict_type]", "body")
        return body

    def _check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model in (None, ""):
            return self.config.model
        if model not in self.config.served_model_names:
            raise HttpError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return self.config.model

    @staticmethod
    def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _validation("Field required [type=missing]" if messages is None
                              else "Input should be a non-empty list [type=list_type]", "body.messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _validation(f"messages.{i}.role Field required [type=missing]", f"body.messages.{i}")
        return messages

    @staticmethod
    def _render(messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
        # tools render first, in the system position, like most chat templates
        parts = [f"<|system|>\n# Tools\n{json.dumps(tools, sort_keys=True)}\n"] if tools else []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<|{m['role']}|>\n{content or ''}\n")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)

    def _check_params(self, body: dict[str, Any], *, chat: bool) -> GenParams:
        """vLLM's request-level 400s (before any prompt is looked at); ``max_tokens`` is filled in later."""
        stream = bool(body.get("stream"))
        if body.get("stream_options") and not stream:
            raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
        for name in ("max_tokens", "max_completion_tokens", "n", "top_logprobs", "priority", "seed", "min_tokens",
                     "truncate_prompt_tokens", "prompt_logprobs") + (() if chat else ("logprobs",)):
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise pydantic_error("int_type", ("body", name), "Input should be a valid integer", value)
        seed = body.get("seed")
        if seed is not None and not INT64_MIN <= seed <= INT64_MAX:
            bound = ("less_than_equal", "le", INT64_MAX) if seed > INT64_MAX else ("greater_than_equal", "ge",
                                                                                    INT64_MIN)
            word = "less" if seed > INT64_MAX else "greater"
            raise pydantic_error(bound[0], ("body", "seed"), f"Input should be {word} than or equal to {bound[2]}",
                                 seed, **{bound[1]: bound[2]})
        n = body.get("n")
        n = 1 if n is None else n
        if n < 1:
            raise _bad(f"n must be at least 1, got {n}.", "n")
        if n > _MAX_N:
            raise _bad(f"n must be at most {_MAX_N}, got {n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES "
                       "environment variable.", "n")
        if n > 1 and body.get("temperature") == 0:
            raise _bad(f"n must be 1 when using greedy sampling, got {n}.", "n")
        self._check_logit_bias(body.get("logit_bias"))
        self._check_structured(body)
        prompt_lp = body.get("prompt_logprobs")
        if prompt_lp is not None:
            if stream and (prompt_lp > 0 or prompt_lp == -1):
                raise _bad("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
            if prompt_lp < -1:
                raise _bad("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs")
            prompt_lp = self._logprobs_count(prompt_lp, "prompt_logprobs")
        if body.get("priority"):
            raise _bad("Scheduling policy 'fcfs' does not support non-zero request priority.", "priority")
        logprobs: int | None
        if chat:
            if body.get("top_logprobs") is not None and not body.get("logprobs"):
                raise _bad("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
            top = body.get("top_logprobs") or 0
            if top < -1:
                raise _bad("`top_logprobs` must be a positive value or -1.", "top_logprobs")
            logprobs = self._logprobs_count(top, "logprobs") if body.get("logprobs") else None
            tools, tool_choice = body.get("tools"), body.get("tool_choice")
            if tool_choice not in (None, "none") and not tools:
                raise _bad("When using `tool_choice`, `tools` must be set.", "tool_choice")
            if tool_choice == "auto" and not self.config.enable_auto_tool_choice:
                raise _bad('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                           "tool_choice")
            if body.get("structured_outputs") is not None and isinstance(tool_choice, dict):
                raise _bad("Cannot use structured outputs with a named tool_choice.", "structured_outputs")
            if body.get("continue_final_message") and body.get("add_generation_prompt", True):
                raise _bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        else:
            lp = body.get("logprobs")
            if lp is not None and lp < -1:
                raise _bad("`logprobs` must be a positive value or -1.", "logprobs")
            logprobs = None if lp is None else self._logprobs_count(lp, "logprobs")
        min_tokens = body.get("min_tokens") or 0
        if min_tokens < 0:
            raise _bad(f"min_tokens must be greater than or equal to 0, got {min_tokens}.", "min_tokens")
        stop = body.get("stop")
        if isinstance(stop, list) and any(s == "" for s in stop):
            raise _bad("stop cannot contain an empty string.", "stop")
        opts = body.get("stream_options")
        if self.config.enable_force_include_usage:
            include_usage = continuous = True
        elif isinstance(opts, dict) and opts:
            include_usage = bool(opts.get("include_usage"))
            continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        else:
            include_usage = continuous = False
        return GenParams(
            chat=chat, max_tokens=0, n=n, min_tokens=min_tokens, ignore_eos=bool(body.get("ignore_eos")),
            echo=bool(body.get("echo")), logprobs=logprobs, prompt_logprobs=prompt_lp,
            return_token_ids=bool(body.get("return_token_ids")),
            tokens_as_ids=bool(body.get("return_tokens_as_token_ids")), stream=stream,
            include_usage=include_usage, continuous_usage=continuous,
        )

    def _logprobs_count(self, requested: int, param: str) -> int:
        """How many logprobs ``requested`` asks for (-1: the vocabulary), within ``--max-logprobs`` (-1: any)."""
        vocab = self.config.vocab_size
        allowed = vocab if self.config.max_logprobs == -1 else self.config.max_logprobs
        count = vocab if requested == -1 else requested
        if count > allowed:
            kind = "prompt" if param == "prompt_logprobs" else "sample"
            raise _bad(f"Requested {kind} logprobs of {count}, which is greater than max allowed: {allowed}", param)
        return count

    def _check_logit_bias(self, bias: Any) -> None:
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise pydantic_error("dict_type", ("body", "logit_bias"), "Input should be a valid dictionary", bias)
        invalid = []
        ids = []
        for key, value in bias.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise pydantic_error("float_type", ("body", "logit_bias", key), "Input should be a valid number",
                                     value)
            try:
                ids.append(int(key))
            except ValueError:
                invalid.append(key)
        if invalid:
            raise _bad(f"logit_bias contains key(s) that cannot be converted to integer token IDs: {invalid!r}",
                       "logit_bias")
        out_of_vocab = [i for i in ids if i < 0 or i >= self.config.vocab_size]
        if out_of_vocab:
            raise _bad(f"token_id(s) {out_of_vocab} in logit_bias contain out-of-vocab token ids. Vocabulary size: "
                       f"{self.config.vocab_size}", "logit_bias")

    def _check_structured(self, body: dict[str, Any]) -> None:
        so = body.get("structured_outputs")
        if so is not None:
            if not isinstance(so, dict):
                raise _validation("Input should be a valid dictionary [type=dict_type]", "body.structured_outputs")
            if sum(so.get(k) is not None for k in ("json", "regex", "choice")) > 1:
                raise _bad("You can only use one kind of constraints for structured outputs "
                           "('json', 'regex' or 'choice').", "structured_outputs")
            if so.get("json") is not None:
                check_json_schema(so["json"])
            if so.get("regex") is not None:
                check_regex(so["regex"])
            if so.get("grammar") is not None:
                check_grammar(so["grammar"])
            choice = so.get("choice")
            if choice is not None and (not isinstance(choice, list) or not choice):
                raise _bad("Failed to transform choices into a grammar: choices must be a non-empty list.",
                           "structured_outputs")
        rf = body.get("response_format")
        if rf is not None:
            if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema",
                                                                   "structural_tag"):
                raise _validation("response_format.type Input should be 'text', 'json_object', 'json_schema' or "
                                  "'structural_tag' [type=literal_error]", "body.response_format")
            if rf["type"] == "json_schema":
                js = rf.get("json_schema")
                if not js:
                    raise _bad("When response_format type is 'json_schema', the 'json_schema' field must be "
                               "provided.", "response_format")
                if not isinstance(js, dict):
                    raise _validation("response_format.json_schema Input should be a valid dictionary "
                                      "[type=dict_type]", "body.response_format.json_schema")
                schema = js.get("schema", js.get("json_schema"))
                if schema is not None:
                    check_json_schema(schema, param="response_format")

    def _max_tokens(self, body: dict[str, Any], prompt_len: int, params: GenParams) -> int:
        """The effective max_tokens for a prompt of ``prompt_len`` tokens, as vLLM 0.33 computes it.

        vLLM 0.33 clamps a requested max_tokens to what the context has left (``get_max_tokens``);
        it answers 400 only when max_tokens alone exceeds max_model_len or the prompt leaves no room.
        """
        chat = params.chat
        limit = self.config.max_model_len
        param = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        requested = body.get(param)
        if requested is not None and requested > limit:
            raise _bad(f"{param}={requested} cannot be greater than max_model_len={limit}. Please request fewer "
                       "output tokens.", param)
        if prompt_len > limit:
            raise _bad(f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                       f"{prompt_len} input tokens, which exceeds this limit even without any output tokens. Please "
                       "reduce the length of the input prompt.", "input_tokens")
        if prompt_len == limit:
            raise _bad(f"The decoder prompt (length {prompt_len}) plus the number of requested output tokens (at "
                       f"least 1) is longer than the maximum model length of {limit}. Make sure that `max_model_len` "
                       "is no smaller than the number of text tokens (prompt + requested output tokens).")
        if requested is None:
            requested = 16 if not chat else self.config.default_max_tokens
        elif requested == 0 and params.echo and not chat:
            return 0  # echo without generation
        elif requested < 1:
            raise _bad(f"{param} must be at least 1, got {requested}.", param)
        allowed = limit - prompt_len if requested is None else min(limit - prompt_len, requested)
        if params.min_tokens > allowed:
            raise _bad(f"min_tokens must be less than or equal to max_tokens={allowed}, got {params.min_tokens}.",
                       "min_tokens")
        return int(allowed)

    def _note_ignored(self, body: dict[str, Any], known: frozenset[str] = _KNOWN_CHAT) -> None:
        ignored = [k for k in body if k not in known]
        for key in ignored:
            self.stats.ignored_fields[key] += 1
        if ignored:
            log.debug("sim_fields_ignored", fields=ignored)

    @staticmethod
    def _schema(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | bool | None, list[str] | None]:
        """(wants JSON, its schema, choices) from ``structured_outputs`` or ``response_format`` (checked before)."""
        so = body.get("structured_outputs") or {}
        if so.get("json") is not None:
            return True, check_json_schema(so["json"]), None
        if so.get("choice"):
            return False, None, [str(c) for c in so["choice"]]
        if so.get("json_object"):
            return True, None, None
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_schema":
            js = rf["json_schema"]
            schema = js.get("schema", js.get("json_schema"))
            return True, {} if schema is None else check_json_schema(schema, param="response_format"), None
        if rf.get("type") == "json_object":
            return True, None, None
        return False, None, None


    # -- generation -------------------------------------------------------------------------------

    async def _chat(self, req: Request) -> Response | StreamingResponse:
        return await self._generate(req, chat=True)

    async def _completions(self, req: Request) -> Response | StreamingResponse:
        return await self._generate(req, chat=False)

    def _prompts(self, body: dict[str, Any]) -> list[tuple[str, list[int]]]:
        """The prompts of a completions request, as (text, token ids): a string, token ids, or a list of either."""
        raw = body.get("prompt")
        if raw is None or raw == "" or raw == []:
            raise _bad("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")

        def is_ids(value: Any) -> bool:
            return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

        if isinstance(raw, str) or is_ids(raw):
            items: list[Any] = [raw]
        elif isinstance(raw, list) and all(isinstance(p, str) or is_ids(p) for p in raw):
            items = raw
            if len(items) > _MAX_PROMPTS:
                raise _bad(f"prompt list length {len(items)} exceeds the maximum allowed count of {_MAX_PROMPTS}. To "
                           "increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS environment variable.", "prompt")
        else:
            raise pydantic_error("string_type", ("body", "prompt"), "Input should be a valid string", raw)
        out: list[tuple[str, list[int]]] = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise _bad("The decoder prompt cannot be empty")
                out.append((item, self.tokenizer.encode(item)))
                continue
            if not item:
                raise _bad("The decoder prompt cannot be empty")
            low, high = min(item), max(item)
            if low < 0:
                raise _bad(f"Token id {low} is out of vocabulary", "prompt")
            if high >= self.config.vocab_size:
                raise _bad(f"Token id {high} is out of vocabulary", "prompt")
            out.append((self.tokenizer.decode(item), list(item)))
        return out

    def _truncate(self, body: dict[str, Any], prompt: tuple[str, list[int]]) -> tuple[str, list[int]]:
        """``truncate_prompt_tokens``: keep the last N tokens (-1: up to max_model_len), like vLLM's default side."""
        keep = body.get("truncate_prompt_tokens")
        if keep is None:
            return prompt
        limit = self.config.max_model_len
        if keep < -1:
            raise pydantic_error("greater_than_equal", ("body", "truncate_prompt_tokens"),
                                 "Input should be greater than or equal to -1", keep, ge=-1)
        if keep > limit:
            raise _bad(f"truncate_prompt_tokens={keep} cannot be greater than max_model_len = {limit}. Please "
                       "request a smaller truncation size.", "truncate_prompt_tokens")
        keep = limit if keep == -1 else keep
        ids = prompt[1]
        if len(ids) <= keep:
            return prompt
        ids = ids[:keep] if body.get("truncation_side") == "right" else ids[len(ids) - keep :]
        return self.tokenizer.decode(ids), ids

    def _answer_text(self, answer: Any, wants_json: bool, schema: dict[str, Any] | bool | None,
                     choices: list[str] | None, prompt: str, i: int, max_tokens: int) -> str:
        if choices:
            if answer in choices and i == 0:
                return str(answer)
            return choices[(zlib.crc32(prompt.encode()) + i) % len(choices)]
        if wants_json:
            # a token is at most 5 characters of compact JSON: longer text is cut at max_tokens anyway
            return conform(answer, schema, max_chars=min(MAX_ANSWER_CHARS, 5 * (max_tokens + 1)))
        return answer if isinstance(answer, str) else json.dumps(answer)

    def _make_choice(self, body: dict[str, Any], params: GenParams, text: str, max_tokens: int, *, index: int,
                     prompt_index: int) -> Choice:
        text, stop_reason = self._apply_stop(text, body)
        pieces = self.tokenizer.pieces(text)
        finish_reason = "stop"
        floor = max_tokens if params.ignore_eos else params.min_tokens
        if len(pieces) < floor:
            pieces += [" sim"] * (floor - len(pieces))  # a model kept from stopping keeps talking
            stop_reason = None
        if len(pieces) > max_tokens or (params.ignore_eos and len(pieces) >= max_tokens):
            pieces, finish_reason, stop_reason = pieces[:max_tokens], "length", None
        ids = [self.tokenizer.encode(p)[0] for p in pieces]
        return Choice(index=index, prompt_index=prompt_index, pieces=pieces, token_ids=ids,
                      finish_reason=finish_reason, stop_reason=stop_reason)

    async def _precheck_schemas(self, schemas: list[tuple[Any, str]]) -> None:
        """Check schemas not seen before in a worker thread, so a costly one never stalls other requests.

        The later (synchronous) checks then find them in the cache; a bad schema's 400 is raised here.
        At most two threads check at once: a flood of new schemas waits for them, nothing else does.
        """
        for schema, param in schemas:
            if schema is not None and checked_json_schema(schema) is None:
                await anyio.to_thread.run_sync(functools.partial(check_json_schema, schema, param=param),
                                               limiter=self._schema_threads)

    @staticmethod
    def _schemas_in(body: dict[str, Any]) -> list[tuple[Any, str]]:
        """The JSON schemas a generation request carries, with the parameter each is reported under."""
        out: list[tuple[Any, str]] = []
        so = body.get("structured_outputs")
        if isinstance(so, dict) and so.get("json") is not None:
            out.append((so["json"], "structured_outputs"))
        rf = body.get("response_format")
        js = rf.get("json_schema") if isinstance(rf, dict) and rf.get("type") == "json_schema" else None
        if isinstance(js, dict):
            out.append((js.get("schema", js.get("json_schema")), "response_format"))
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            out.append((fmt.get("schema"), "text"))
        return out

    async def _generate(self, req: Request, *, chat: bool) -> Response | StreamingResponse:
        body = self._json(req)
        await self._precheck_schemas(self._schemas_in(body))
        model = self._check_model(body)
        params = self._check_params(body, chat=chat)
        messages: list[dict[str, Any]] = []
        if chat:
            messages = self._messages(body)
            rendered = self._render(messages, body.get("tools"), bool(body.get("add_generation_prompt", True)))
            prompts = [(rendered, self.tokenizer.encode(rendered))]
        else:
            prompts = self._prompts(body)
        prompts = [self._truncate(body, p) for p in prompts]
        limits = [self._max_tokens(body, len(ids), params) for _, ids in prompts]
        params.max_tokens = max(limits)
        self._note_ignored(body)
        if self.engine.dead:
            raise HttpError(500, "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                            "InternalServerError")
        fault = self.faults.draw()
        if fault is not None:
            self.stats.faults_injected[fault] += 1
            early = await self._early_fault(fault)
            if early is not None:
                return early

        wants_json, schema, allowed = self._schema(body)
        echo_chat = ""
        if chat and params.echo and messages and messages[-1].get("role") == "assistant":
            content = messages[-1].get("content")
            echo_chat = content if isinstance(content, str) else ""
        choices: list[Choice] = []
        for p_idx, (prompt, _ids) in enumerate(prompts):
            sim_req = SimRequest("chat" if chat else "completions", model, tuple(messages), prompt, body,
                                 schema if isinstance(schema, dict) else None)
            answer = self.policy(sim_req) if limits[p_idx] else ""
            for i in range(params.n):
                text = (self._answer_text(answer, wants_json, schema, allowed, prompt, i, limits[p_idx])
                        if limits[p_idx] else "")
                choice = self._make_choice(body, params, text, limits[p_idx], index=p_idx * params.n + i,
                                           prompt_index=p_idx)
                choice.echo_text = echo_chat if chat else (prompt if params.echo else "")
                choices.append(choice)
        try:
            for c in choices:
                c.seq = self.engine.submit(prompts[c.prompt_index][1], max(len(c.pieces), 1), stream=params.stream,
                                           salt=body.get("cache_salt"))
        except EngineDead as exc:
            for c in choices:
                if c.seq is not None:
                    self.engine.abort(c.seq)
            raise HttpError(500, str(exc), "InternalServerError") from exc
        rid = req.headers.get("x-request-id") or body.get("request_id") or uuid.uuid4().hex
        ctx = _Ctx(chat=chat, model=model, rid=f"{'chatcmpl' if chat else 'cmpl'}-{rid}", choices=choices,
                   prompts=prompts, params=params)
        if params.stream:
            return StreamingResponse(self._sse(ctx, fault))
        try:
            for c in choices:
                await c.seq.done.wait()
        finally:
            for c in choices:
                self.engine.abort(c.seq)
        error = next((c.seq.error for c in choices if c.seq.error), None)
        if error:
            raise HttpError(500, error, "InternalServerError")
        for c in choices:
            self.stats.finished_by_reason[c.finish_reason] += 1
        self.stats.request_params_n.observe(params.n)
        self.stats.request_params_max_tokens.observe(params.max_tokens)
        payload = self._final_payload(ctx)
        if fault == "malformed":
            return Response(200, json.dumps(payload).encode()[:40])
        if fault == "truncate":
            return Response(200, json.dumps(payload).encode(), truncate=True)
        return json_response(200, payload)

    async def _responses(self, req: Request) -> Response | StreamingResponse:
        """A minimal ``/v1/responses``: text ``input`` (or input messages) in, one ``message`` output item out."""
        body = self._json(req)
        await self._precheck_schemas(self._schemas_in(body))
        model = self._check_model(body)
        raw = body.get("input")
        if isinstance(raw, str) and raw:
            messages: list[dict[str, Any]] = [{"role": "user", "content": raw}]
        elif isinstance(raw, list) and raw and all(isinstance(m, dict) for m in raw):
            messages = [{"role": m.get("role", "user"), "content": _input_text(m.get("content"))} for m in raw]
        else:
            raise pydantic_error("missing" if raw is None else "string_type", ("body", "input"),
                                 "Field required" if raw is None else "Input should be a valid string", raw)
        if isinstance(body.get("instructions"), str):
            messages.insert(0, {"role": "system", "content": body["instructions"]})
        if body.get("stream"):
            raise HttpError(501, "The simulator does not stream /v1/responses.", "NotImplementedError")
        self._note_ignored(body, _RESPONSES_KNOWN)
        params = GenParams(chat=True, max_tokens=0)
        prompt = self._render(messages, None, True)
        ids = self.tokenizer.encode(prompt)
        max_tokens = self._max_tokens({"max_tokens": body.get("max_output_tokens")}, len(ids), params)
        if self.engine.dead:
            raise HttpError(500, "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                            "InternalServerError")
        text_opts = body.get("text")
        fmt = text_opts.get("format") if isinstance(text_opts, dict) else None
        schema: dict[str, Any] | bool | None = None
        wants_json = isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and fmt.get("schema") is not None:
            schema = check_json_schema(fmt["schema"], param="text")
        answer = self.policy(SimRequest("responses", model, tuple(messages), prompt, body,
                                        schema if isinstance(schema, dict) else None))
        text = self._answer_text(answer, wants_json, schema, None, prompt, 0, max_tokens)
        choice = self._make_choice({}, params, text, max_tokens, index=0, prompt_index=0)
        seq = self.engine.submit(ids, max(len(choice.pieces), 1), salt=body.get("cache_salt"))
        try:
            await seq.done.wait()
        finally:
            self.engine.abort(seq)
        if seq.error:
            raise HttpError(500, seq.error, "InternalServerError")
        self.stats.finished_by_reason[choice.finish_reason] += 1
        rid = req.headers.get("x-request-id") or body.get("request_id") or uuid.uuid4().hex
        incomplete = choice.finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        return json_response(200, {
            "id": f"resp_{rid}", "object": "response", "created_at": int(time.time()), "model": model,
            "status": status, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "output": [{"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "status": status,
                        "content": [{"type": "output_text", "text": choice.text, "annotations": [],
                                     "logprobs": None}]}],
            "parallel_tool_calls": True, "temperature": body.get("temperature"), "tool_choice": "auto",
            "tools": [], "top_p": body.get("top_p"), "background": False, "error": None,
            "previous_response_id": body.get("previous_response_id"), "reasoning": None,
            "service_tier": "auto", "store": False, "text": text_opts or {"format": {"type": "text"}},
            "truncation": "disabled", "metadata": body.get("metadata"), "user": body.get("user"),
            "usage": {"input_tokens": len(ids), "input_tokens_details": {"cached_tokens": max(seq.cached_tokens, 0)},
                      "output_tokens": len(choice.pieces), "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": len(ids) + len(choice.pieces)},
        })

    async def _early_fault(self, fault: Fault) -> Response | None:
        if fault == "server_error":
            return HttpError(500, "Simulated internal server error.", "InternalServerError").response
        if fault == "unavailable":
            return HttpError(503, "Service Unavailable", "ServiceUnavailable").response
        if fault == "rate_limited":
            resp = HttpError(429, "Too Many Requests (simulated gateway)", "RateLimitError").response
            resp.headers.append(("retry-after", "0"))
            return resp
        if fault == "hang":
            await anyio.sleep(self.config.hang_seconds)
            return HttpError(500, "Simulated hang ended.", "InternalServerError").response
        return None

    @staticmethod
    def _apply_stop(text: str, body: dict[str, Any]) -> tuple[str, str | None]:
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
        best: tuple[int, str] | None = None
        for s in stops:
            idx = text.find(s) if s else -1
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return text, None
        idx, s = best
        return text[: idx + len(s)] if body.get("include_stop_str_in_output") else text[:idx], s

    def _usage(self, ctx: _Ctx, completion_tokens: int | None = None) -> dict[str, Any]:
        prompt_tokens = sum(len(ids) for _, ids in ctx.prompts)
        done = sum(len(c.pieces) for c in ctx.choices) if completion_tokens is None else completion_tokens
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + done,
                                 "completion_tokens": done, "prompt_tokens_details": None}
        if self.config.enable_prompt_tokens_details:
            firsts = {c.prompt_index: c for c in reversed(ctx.choices)}
            usage["prompt_tokens_details"] = {"cached_tokens": sum(max(c.seq.cached_tokens, 0)
                                                                   for c in firsts.values())}
        return usage

    def _choice_logprobs(self, ctx: _Ctx, c: Choice, start: int, end: int, *, with_echo: bool) -> Any:
        p = ctx.params
        if p.logprobs is None:
            return None
        ids = c.token_ids[start:end]
        if ctx.chat:
            return chat_logprobs(self.tokenizer, ids, p.logprobs, as_ids=p.tokens_as_ids, start=start)
        prompt_ids = ctx.prompts[c.prompt_index][1]
        if with_echo:
            return completion_logprobs(self.tokenizer, prompt_ids + ids, p.logprobs, as_ids=p.tokens_as_ids,
                                       first_is_prompt_start=True)
        offset = len(c.echo_text) + len("".join(c.pieces[:start]))
        return completion_logprobs(self.tokenizer, ids, p.logprobs, as_ids=p.tokens_as_ids, text_offset=offset,
                                   start=len(prompt_ids) + start)

    def _prompt_logprobs(self, ctx: _Ctx, prompt_index: int) -> Any:
        p = ctx.params
        if p.prompt_logprobs is None:
            return None
        return prompt_logprobs(self.tokenizer, ctx.prompts[prompt_index][1], p.prompt_logprobs)

    def _final_payload(self, ctx: _Ctx) -> dict[str, Any]:
        p = ctx.params
        base = {"id": ctx.rid, "created": ctx.created, "model": ctx.model, "system_fingerprint": SYSTEM_FINGERPRINT}
        out: list[dict[str, Any]] = []
        for c in ctx.choices:
            lp = self._choice_logprobs(ctx, c, 0, len(c.pieces), with_echo=p.echo and not ctx.chat)
            if ctx.chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.echo_text + c.text,
                                                          "reasoning": None, "tool_calls": []},
                            "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                            "token_ids": c.token_ids if p.return_token_ids else None})
            else:
                out.append({"index": c.index, "text": c.echo_text + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                            "token_ids": c.token_ids if p.return_token_ids else None,
                            "prompt_logprobs": self._prompt_logprobs(ctx, c.prompt_index),
                            "prompt_token_ids": ctx.prompts[c.prompt_index][1] if p.return_token_ids else None})
        if ctx.chat:
            return {**base, "object": "chat.completion", "choices": out, "usage": self._usage(ctx),
                    "prompt_logprobs": self._prompt_logprobs(ctx, 0),
                    "prompt_token_ids": ctx.prompts[0][1] if p.return_token_ids else None,
                    "kv_transfer_params": None}
        return {**base, "object": "text_completion", "choices": out, "usage": self._usage(ctx),
                "kv_transfer_params": None}

    def _chunk(self, ctx: _Ctx, c: Choice, start: int, end: int, *, first: bool = False, last: bool = False,
               sent: int = 0) -> bytes:
        p = ctx.params
        text = "".join(c.pieces[start:end])
        choice: dict[str, Any]
        if ctx.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": c.echo_text} if first else {"content": text}
            logprobs = None if first else self._choice_logprobs(ctx, c, start, end, with_echo=False)
            choice = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            obj = "chat.completion.chunk"
        else:
            echo = c.echo_text if start == 0 else ""
            choice = {"index": c.index, "text": echo + text, "finish_reason": None,
                      "logprobs": self._choice_logprobs(ctx, c, start, end, with_echo=bool(echo) and p.echo)}
            obj = "text_completion"
            if p.return_token_ids and start == 0:
                choice["prompt_token_ids"] = ctx.prompts[c.prompt_index][1]
        if p.return_token_ids and not first:
            choice["token_ids"] = c.token_ids[start:end]
        if last:
            choice["finish_reason"] = c.finish_reason
            choice["stop_reason"] = c.stop_reason
        payload: dict[str, Any] = {"id": ctx.rid, "object": obj, "created": ctx.created, "model": ctx.model,
                                   "choices": [choice]}
        if ctx.chat and first and p.return_token_ids:
            payload["prompt_token_ids"] = ctx.prompts[c.prompt_index][1]
        if p.continuous_usage:
            payload["usage"] = self._usage(ctx, sent)
        if last:
            payload["system_fingerprint"] = SYSTEM_FINGERPRINT
        return _event(payload)

    async def _sse(self, ctx: _Ctx, fault: Fault | None) -> AsyncIterator[bytes]:
        chunks = 0
        sent_total = 0
        try:
            for c in ctx.choices:
                seq = c.seq
                assert seq.progress is not None
                total = len(c.pieces)
                if ctx.chat:
                    yield self._chunk(ctx, c, 0, 0, first=True, sent=sent_total)
                sent = 0
                async with seq.progress:
                    async for generated in seq.progress:
                        upto = min(generated, total)
                        if fault == "mid_stream_error" and chunks >= 2:
                            yield _event({"error": {"message": "Simulated engine error mid-stream.",
                                                    "type": "InternalServerError", "param": None, "code": 500}})
                            yield b"data: [DONE]\n\n"
                            return
                        if fault == "truncate" and chunks >= 2:
                            return
                        if fault == "malformed" and chunks >= 2:
                            yield b'data: {"id": "' + ctx.rid.encode() + b'", "choices": [{"delta": {"con\n\n'
                            return
                        if upto > sent or upto == total:
                            sent_total += upto - sent
                            yield self._chunk(ctx, c, sent, upto, last=upto >= total, sent=sent_total)
                            sent = upto
                            chunks += 1
                if seq.error:
                    yield _event({"error": {"message": seq.error, "type": "InternalServerError", "param": None,
                                            "code": 500}})
                    yield b"data: [DONE]\n\n"
                    return
                if sent < total or total == 0:
                    sent_total += total - sent
                    yield self._chunk(ctx, c, sent, total, last=True, sent=sent_total)
                self.stats.finished_by_reason[c.finish_reason] += 1
            self.stats.request_params_n.observe(ctx.params.n)
            self.stats.request_params_max_tokens.observe(ctx.params.max_tokens)
            if ctx.params.include_usage:
                yield _event({"id": ctx.rid, "object": "chat.completion.chunk" if ctx.chat else "text_completion",
                              "created": ctx.created, "model": ctx.model, "choices": [], "usage": self._usage(ctx)})
            yield b"data: [DONE]\n\n"
        finally:
            for c in ctx.choices:
                self.engine.abort(c.seq)


class _Ctx:
    __slots__ = ("chat", "choices", "created", "model", "params", "prompts", "rid")

    def __init__(self, *, chat: bool, model: str, rid: str, choices: list[Choice],
                 prompts: list[tuple[str, list[int]]], params: GenParams) -> None:
        self.chat = chat
        self.model = model
        self.rid = rid
        self.choices = choices
        self.prompts = prompts
        self.params = params
        self.created = int(time.time())


def _input_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
