"""Routes, validation and response shapes of vLLM's OpenAI-compatible server, on top of the engine."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import structlog

from ._http import Request, Response, StreamingResponse, json_response
from .config import SIM_VERSION, SYSTEM_FINGERPRINT, FaultRates, SimConfig
from .engine import Engine, EngineDead, Sequence
from .faults import Fault, FaultInjector
from .metrics import render_metrics
from .policy import Policy, SimRequest
from .stats import SimStats
from .structured import conform
from .tokenizer import Tokenizer

__all__ = ("SimApp",)

log = structlog.get_logger(__name__)

_GUARDED = ("/v1", "/v2", "/inference", "/cohere")
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
    "metadata", "store", "service_tier", "prompt",  "suffix", "best_of",
})


class HttpError(Exception):
    """An error response in vLLM's envelope."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.response = json_response(
            status, {"error": {"message": message, "type": type_, "param": param, "code": status}}
        )


def _bad(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, "BadRequestError", param)


def _validation(message: str, param: str) -> HttpError:
    return HttpError(400, f"1 validation error:\n  {message}", "Bad Request", param)


class SimApp:
    """The request handler; one per simulated server."""

    def __init__(self, config: SimConfig, engine: Engine, stats: SimStats, policy: Policy) -> None:
        self.config = config
        self.engine = engine
        self.stats = stats
        self.policy = policy
        self.tokenizer = Tokenizer()
        self.faults = FaultInjector(config.faults, config.seed)
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
            ("GET", "/_sim/state"): self._state,
            ("POST", "/_sim/faults"): self._set_faults,
            ("POST", "/reset_prefix_cache"): self._reset_cache,
        }

    async def __call__(self, req: Request) -> Response | StreamingResponse:
        """Route one request, with vLLM's auth rule and the simulator's marker header."""
        self.stats.requests_by_endpoint[req.path] += 1
        response = await self._dispatch(req)
        response.headers.extend(_SIM_HEADERS)
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
        return json_response(200, {**self.stats.snapshot(), **self.engine.state(),
                                   "config": self.config.model_dump(mode="json")})

    async def _set_faults(self, req: Request) -> Response:
        body = self._json(req)
        if "rates" in body:
            self.faults.set_rates(FaultRates.model_validate(body["rates"]))
        if "script" in body:
            self.faults.script(body["script"])
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
        return json_response(200, {"count": len(tokens), "max_model_len": self.config.max_model_len,
                                   "tokens": tokens, "token_strs": None})

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

    def _common_validation(self, body: dict[str, Any], prompt_len: int, *, chat: bool) -> int:
        """vLLM's 400s; returns the effective max_tokens."""
        stream = bool(body.get("stream"))
        if body.get("stream_options") is not None and not stream:
            raise _bad("Stream options can only be defined when stream=True.", "stream_options")
        if body.get("prompt_logprobs") is not None and stream:
            raise _bad("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        so = body.get("structured_outputs")
        if so is not None:
            if not isinstance(so, dict):
                raise _validation("Input should be a valid dictionary [type=dict_type]", "body.structured_outputs")
            if sum(so.get(k) is not None for k in ("json", "regex", "choice")) > 1:
                raise _bad("You can only use one kind of constraints for structured outputs "
                           "('json', 'regex' or 'choice').", "structured_outputs")
        rf = body.get("response_format")
        if rf is not None:
            if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema",
                                                                   "structural_tag"):
                raise _validation("response_format.type Input should be 'text', 'json_object', 'json_schema' or "
                                  "'structural_tag' [type=literal_error]", "body.response_format")
            if rf["type"] == "json_schema" and not rf.get("json_schema"):
                raise _bad("When response_format type is 'json_schema', the 'json_schema' field must be provided.",
                           "response_format")
        for name in ("max_tokens", "max_completion_tokens", "n", "top_logprobs", "priority"):
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise _validation(f"{name} Input should be a valid integer [type=int_type]", f"body.{name}")
        if body.get("priority"):
            raise _bad("Scheduling policy 'fcfs' does not support non-zero request priority.", "priority")
        if chat:
            if body.get("top_logprobs") is not None and not body.get("logprobs"):
                raise _bad("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
            top = body.get("top_logprobs") or 0
            if top > self.config.max_logprobs or top < -1:
                raise _bad(f"Requested sample logprobs of {top}, which is greater than max allowed: "
                           f"{self.config.max_logprobs}", "top_logprobs")
            tools, tool_choice = body.get("tools"), body.get("tool_choice")
            if tool_choice not in (None, "none") and not tools:
                raise _bad("When using `tool_choice`, `tools` must be set.", "tool_choice")
            if tool_choice == "auto" and not self.config.enable_auto_tool_choice:
                raise _bad('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                           "tool_choice")
            if so is not None and isinstance(tool_choice, dict):
                raise _bad("Cannot use structured outputs with a named tool_choice.", "structured_outputs")
            if body.get("continue_final_message") and body.get("add_generation_prompt", True):
                raise _bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        limit = self.config.max_model_len
        if prompt_len >= limit:
            raise _bad(f"This model's maximum context length is {limit} tokens. However, your request has "
                       f"{prompt_len} input tokens. Please reduce the length of the input messages.", "messages"
                       if chat else "prompt")
        requested = body.get("max_completion_tokens") if chat else None
        if requested is None:
            requested = body.get("max_tokens")
        if requested is None:
            if not chat:
                requested = 16
                if prompt_len + requested > limit:
                    requested = limit - prompt_len
            else:
                requested = limit - prompt_len
                if self.config.default_max_tokens is not None:
                    requested = min(requested, self.config.default_max_tokens)
            return int(requested)
        if requested < 1:
            raise _bad(f"max_tokens must be at least 1, got {requested}.", "max_tokens")
        if prompt_len + requested > limit:
            raise _bad(f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{requested} output tokens and your prompt contains at least {prompt_len} input tokens, "
                       f"for a total of at least {prompt_len + requested} tokens. Please reduce the length of the "
                       "input prompt or the number of requested output tokens.", "max_tokens")
        return int(requested)

    def _note_ignored(self, body: dict[str, Any]) -> None:
        ignored = [k for k in body if k not in _KNOWN_CHAT]
        for key in ignored:
            self.stats.ignored_fields[key] += 1
        if ignored:
            log.debug("sim_fields_ignored", fields=ignored)

    @staticmethod
    def _schema(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None, list[str] | None]:
        """(wants JSON, its schema, choices) from ``structured_outputs`` or ``response_format``."""
        so = body.get("structured_outputs") or {}
        if so.get("json") is not None:
            schema = so["json"]
            if isinstance(schema, str):
                schema = json.loads(schema)
            return True, schema, None
        if so.get("choice"):
            return False, None, [str(c) for c in so["choice"]]
        if so.get("json_object"):
            return True, None, None
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_schema":
            js = rf["json_schema"]
            return True, js.get("schema") or js.get("json_schema") or {}, None
        if rf.get("type") == "json_object":
            return True, None, None
        return False, None, None

    # -- generation -------------------------------------------------------------------------------

    async def _chat(self, req: Request) -> Response | StreamingResponse:
        return await self._generate(req, chat=True)

    async def _completions(self, req: Request) -> Response | StreamingResponse:
        return await self._generate(req, chat=False)

    async def _generate(self, req: Request, *, chat: bool) -> Response | StreamingResponse:
        body = self._json(req)
        model = self._check_model(body)
        if chat:
            messages = self._messages(body)
            prompt = self._render(messages, body.get("tools"), bool(body.get("add_generation_prompt", True)))
        else:
            messages = []
            raw = body.get("prompt")
            if isinstance(raw, list) and len(raw) == 1:
                raw = raw[0]
            if isinstance(raw, list) and all(isinstance(t, int) for t in raw):
                raw = self.tokenizer.decode(raw)
            if not isinstance(raw, str):
                raise _validation("prompt Input should be a valid string [type=string_type]", "body.prompt")
            prompt = raw
        prompt_ids = self.tokenizer.encode(prompt)
        max_tokens = self._common_validation(body, len(prompt_ids), chat=chat)
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

        wants_json, schema, choices = self._schema(body)
        sim_req = SimRequest("chat" if chat else "completions", model, tuple(messages), prompt, body, schema)
        answer = self.policy(sim_req)
        if choices:
            text = choices[hash(prompt) % len(choices)] if answer not in choices else str(answer)
        elif wants_json:
            text = conform(answer, schema)
        else:
            text = answer if isinstance(answer, str) else json.dumps(answer)
        text, stop_reason = self._apply_stop(text, body)
        pieces = self.tokenizer.pieces(text)
        finish_reason = "stop"
        if len(pieces) > max_tokens:
            pieces, finish_reason = pieces[:max_tokens], "length"
        self.tokenizer.encode(text)  # keep the vocabulary able to detokenize answers
        stream = bool(body.get("stream"))
        try:
            seq = self.engine.submit(prompt_ids, max(len(pieces), 1), stream=stream, salt=body.get("cache_salt"))
        except EngineDead as exc:
            raise HttpError(500, str(exc), "InternalServerError") from exc
        rid = req.headers.get("x-request-id") or body.get("request_id") or uuid.uuid4().hex
        ctx = _Ctx(chat=chat, model=model, rid=f"{'chatcmpl' if chat else 'cmpl'}-{rid}", pieces=pieces,
                   finish_reason=finish_reason, stop_reason=stop_reason, prompt_tokens=len(prompt_ids), seq=seq)
        if stream:
            opts = body.get("stream_options") or {}
            include_usage = self.config.enable_force_include_usage or (
                isinstance(opts, dict) and bool(opts.get("include_usage", True)) and "stream_options" in body)
            return StreamingResponse(self._sse(ctx, fault, include_usage))
        try:
            await seq.done.wait()
        finally:
            self.engine.abort(seq)
        if seq.error:
            raise HttpError(500, seq.error, "InternalServerError")
        self.stats.finished_by_reason[finish_reason] += 1
        payload = self._final_payload(ctx)
        if fault == "malformed":
            return Response(200, json.dumps(payload).encode()[:40])
        if fault == "truncate":
            return Response(200, json.dumps(payload).encode(), truncate=True)
        return json_response(200, payload)

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

    def _usage(self, ctx: _Ctx) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": ctx.prompt_tokens,
                                 "total_tokens": ctx.prompt_tokens + len(ctx.pieces),
                                 "completion_tokens": len(ctx.pieces), "prompt_tokens_details": None}
        if self.config.enable_prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": max(ctx.seq.cached_tokens, 0)}
        return usage

    def _final_payload(self, ctx: _Ctx) -> dict[str, Any]:
        text = "".join(ctx.pieces)
        base = {"id": ctx.rid, "created": ctx.created, "model": ctx.model, "system_fingerprint": SYSTEM_FINGERPRINT}
        if ctx.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text, "reasoning": None,
                                                              "tool_calls": []},
                                      "logprobs": None, "finish_reason": ctx.finish_reason,
                                      "stop_reason": ctx.stop_reason}
            return {**base, "object": "chat.completion", "choices": [choice], "usage": self._usage(ctx),
                    "prompt_logprobs": None, "kv_transfer_params": None}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ctx.finish_reason,
                  "stop_reason": ctx.stop_reason, "prompt_logprobs": None}
        return {**base, "object": "text_completion", "choices": [choice], "usage": self._usage(ctx),
                "kv_transfer_params": None}

    def _chunk(self, ctx: _Ctx, text: str | None, *, first: bool = False, last: bool = False) -> bytes:
        if ctx.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": None}
            obj = "text_completion"
        if last:
            choice["finish_reason"] = ctx.finish_reason
            choice["stop_reason"] = ctx.stop_reason
        payload: dict[str, Any] = {"id": ctx.rid, "object": obj, "created": ctx.created, "model": ctx.model,
                                   "choices": [choice]}
        if last:
            payload["system_fingerprint"] = SYSTEM_FINGERPRINT
        return _event(payload)

    async def _sse(self, ctx: _Ctx, fault: Fault | None, include_usage: bool) -> AsyncIterator[bytes]:
        seq = ctx.seq
        assert seq.progress is not None
        total = len(ctx.pieces)
        try:
            if ctx.chat:
                yield self._chunk(ctx, None, first=True)
            sent = 0
            chunks = 0
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
                        yield self._chunk(ctx, "".join(ctx.pieces[sent:upto]), last=upto >= total)
                        sent = upto
                        chunks += 1
            if seq.error:
                yield _event({"error": {"message": seq.error, "type": "InternalServerError", "param": None,
                                        "code": 500}})
                yield b"data: [DONE]\n\n"
                return
            if sent < total or total == 0:
                yield self._chunk(ctx, "".join(ctx.pieces[sent:]), last=True)
            self.stats.finished_by_reason[ctx.finish_reason] += 1
            if include_usage:
                yield _event({"id": ctx.rid, "object": "chat.completion.chunk" if ctx.chat else "text_completion",
                              "created": ctx.created, "model": ctx.model, "choices": [],
                              "usage": self._usage(ctx)})
            yield b"data: [DONE]\n\n"
        finally:
            self.engine.abort(seq)


class _Ctx:
    __slots__ = ("chat", "created", "finish_reason", "model", "pieces", "prompt_tokens", "rid", "seq", "stop_reason")

    def __init__(self, *, chat: bool, model: str, rid: str, pieces: list[str], finish_reason: str,
                 stop_reason: str | None, prompt_tokens: int, seq: Sequence) -> None:
        self.chat = chat
        self.model = model
        self.rid = rid
        self.pieces = pieces
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.prompt_tokens = prompt_tokens
        self.seq = seq
        self.created = int(time.time())


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

