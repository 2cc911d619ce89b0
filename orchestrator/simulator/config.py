"""Settings of the simulated server; the names mirror ``vllm serve`` flags."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ("FaultRates", "LatencyModel", "SimConfig")

SIM_VERSION = "0.33.0+orchestrator-simulator"
SYSTEM_FINGERPRINT = "orchestrator-simulator"


class LatencyModel(BaseModel):
    """Cost of one engine step, in virtual seconds (an 8B model on one H100, after llm-d's tables).

    ``step = step_overhead_s + decode_s_per_seq * n_decoding + prefill_s_per_token * n_prefill_tokens``
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_overhead_s: float = Field(0.010, ge=0)
    decode_s_per_seq: float = Field(0.00008, ge=0)
    prefill_s_per_token: float = Field(0.00025, ge=0)
    jitter: float = Field(0.0, ge=0, le=0.7, description="relative sigma of Gaussian noise on each step")

    def step_seconds(self, n_decode: int, n_prefill_tokens: int) -> float:
        """Virtual duration of a step, before jitter."""
        return self.step_overhead_s + self.decode_s_per_seq * n_decode + self.prefill_s_per_token * n_prefill_tokens

    def capacity(self, *, requests: int, output_tokens: int, prefill_tokens: int, max_num_seqs: int) -> float:
        """Requests per virtual second if every step ran a full batch of ``max_num_seqs``.

        Each request takes one batch slot per output token (its prefill step samples the first one), so
        the step overhead is shared by a full batch; decode and prefill costs are per sequence/token.
        """
        busy = (
            self.step_overhead_s * output_tokens / max_num_seqs
            + self.decode_s_per_seq * max(output_tokens - requests, 0)
            + self.prefill_s_per_token * prefill_tokens
        )
        return requests / busy if busy > 0 else float("inf")


class FaultRates(BaseModel):
    """Probability, per generation request, of each injected fault (drawn in this order)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server_error: float = Field(0.0, ge=0, le=1, description="HTTP 500 InternalServerError")
    unavailable: float = Field(0.0, ge=0, le=1, description="HTTP 503")
    rate_limited: float = Field(0.0, ge=0, le=1, description="HTTP 429 from a gateway, with Retry-After")
    hang: float = Field(0.0, ge=0, le=1, description="no response bytes until the client gives up")
    malformed: float = Field(0.0, ge=0, le=1, description="200 with a body that is not JSON")
    truncate: float = Field(0.0, ge=0, le=1, description="connection closed mid-body / stream without [DONE]")
    mid_stream_error: float = Field(0.0, ge=0, le=1, description="error event after a few chunks")


class SimConfig(BaseModel):
    """Everything that shapes the simulated vLLM server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    served_model_names: tuple[str, ...] = ("sim-model",)
    api_keys: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    max_model_len: int = Field(8192, gt=0)
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(8192, gt=0)
    kv_cache_tokens: int = Field(262144, gt=0)
    block_size: int = Field(16, gt=0)
    enable_prefix_caching: bool = True
    enable_prompt_tokens_details: bool = False
    enable_force_include_usage: bool = False
    enable_auto_tool_choice: bool = False
    enable_request_id_headers: bool = Field(False, description="answer with an X-Request-Id header, like vLLM's flag")
    enable_tokenizer_info_endpoint: bool = Field(False, description="serve /tokenizer_info, as vLLM's flag does")
    root_path: str = Field("", description="path prefix a proxy mounts the server under (--root-path)")
    vocab_size: int = Field(151936, gt=0, description="token ids at or above this are out of vocabulary")
    max_logprobs: int = 20
    default_max_tokens: int | None = Field(None, description="cap on max_tokens when a chat request omits it")
    latency: LatencyModel = LatencyModel()
    time_scale: float = Field(1.0, gt=0, description="real seconds per virtual second; 0.01 runs 100x faster")
    faults: FaultRates = FaultRates()
    hang_seconds: float = Field(600.0, gt=0, description="how long a 'hang' fault holds the request")
    seed: int = 0
    ignored_flags: tuple[str, ...] = Field((), description="`vllm serve` options accepted but not modelled")
    server_dev_mode: bool = Field(False, description="VLLM_SERVER_DEV_MODE: serve /reset_prefix_cache, as vLLM does")
    sim_admin: bool = Field(False, description="serve /_sim/state and /_sim/faults (behind the API key when one is set)")
    idle_timeout_s: float = Field(5.0, gt=0, description="close a keep-alive connection idle this long (uvicorn's 5 s)")
    request_timeout_s: float = Field(30.0, gt=0, description="a request's head and body must arrive within this")
    send_timeout_s: float = Field(60.0, gt=0, description="a client that takes longer to read one write is dropped")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="larger request bodies get 413")

    @property
    def model(self) -> str:
        """The canonical served name (the first)."""
        return self.served_model_names[0]
