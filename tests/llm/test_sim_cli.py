"""``orchestrator sim-llm`` takes a `vllm serve` command line: every vLLM 0.33 option, VLLM_API_KEY, --root-path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from orchestrator.simulator._vllm_flags import BOOL_FLAGS, LIST_FLAGS, VALUE_FLAGS
from orchestrator.simulator.cli import config_from_args, human_readable_int

VLLM_SERVE = ["serve", "Qwen/Qwen3-8B", "--dtype", "bfloat16", "--enforce-eager", "--gpu-memory-utilization", "0.9",
              "--max-model-len", "32k", "--tensor-parallel-size", "2", "-tp", "2", "--served-model-name", "agent-llm",
              "alias", "--max_num_seqs", "64", "-O3", "--compilation-config.level", "3", "--no-enable-prefix-caching",
              "--trust-remote-code", "--kv-cache-dtype", "fp8", "--disable-log-stats"]


def test_a_vllm_serve_command_line_configures_the_simulator() -> None:
    config, _ = config_from_args(VLLM_SERVE, env={})
    assert config.served_model_names == ("agent-llm", "alias")
    assert config.max_model_len == 32000
    assert config.max_num_seqs == 64
    assert config.enable_prefix_caching is False
    assert config.api_keys == ()
    assert "--dtype" in config.ignored_flags
    assert "--enforce-eager" in config.ignored_flags
    assert "-tp" in config.ignored_flags


def test_every_vllm_option_is_accepted() -> None:
    argv = ["m"]
    for flag in sorted(BOOL_FLAGS):
        argv.append(flag)
    for flag in sorted(VALUE_FLAGS - {"--model", "--config", "--host", "--port", "--root-path", "--max-model-len",
                                      "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--seed",
                                      "--max-logprobs"}):
        argv += [flag, "1"]
    for flag in sorted(LIST_FLAGS - {"--served-model-name", "--api-key"}):
        argv += [flag, "a", "b"]
    config, args = config_from_args(argv, env={})
    assert args.model == "m"
    assert len(config.ignored_flags) > 250


def test_unknown_option_is_an_error_as_in_vllm() -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(["m", "--not-a-vllm-option", "1"], env={})
    assert info.value.code == 2


def test_api_key_flag_wins_over_env() -> None:
    assert config_from_args([], env={"VLLM_API_KEY": "env"})[0].api_keys == ("env",)
    assert config_from_args(["--api-key", "a", "b"], env={"VLLM_API_KEY": "env"})[0].api_keys == ("a", "b")


def test_exposure_options() -> None:
    config, _ = config_from_args([], env={})
    assert (config.sim_admin, config.idle_timeout_s, config.request_timeout_s) == (False, 5.0, 30.0)
    assert config_from_args([], env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "12"})[0].idle_timeout_s == 12.0  # as vLLM
    assert config.server_dev_mode is False
    assert config_from_args([], env={"VLLM_SERVER_DEV_MODE": "1"})[0].server_dev_mode is True
    config, _ = config_from_args(["--sim-admin", "--idle-timeout-s", "0.5", "--request-timeout-s", "3"],
                                 env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "12"})
    assert (config.sim_admin, config.idle_timeout_s, config.request_timeout_s) == (True, 0.5, 3.0)
    for argv, env in ((["--idle-timeout-s", "0"], {}), ([], {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "soon"})):
        with pytest.raises(SystemExit) as info:
            config_from_args(argv, env=env)
        assert info.value.code == 2


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("max_model_len: 4096\nenforce_eager: true\nserved_model_name: [x]\nenable_prefix_caching: false\n")
    config, _ = config_from_args(["m", "--config", str(path)], env={})
    assert (config.max_model_len, config.served_model_names, config.enable_prefix_caching) == (4096, ("x",), False)


def test_human_readable_counts() -> None:
    assert [human_readable_int(v) for v in ("8192", "2k", "2K", "1.5k")] == [8192, 2000, 2048, 1500]


@pytest.fixture
async def served() -> AsyncIterator[str]:
    argv = [sys.executable, "-m", "orchestrator.simulator", *VLLM_SERVE, "--port", "0", "--root-path", "/llm",
            "--enable-request-id-headers", "--time-scale", "0.001", "--sim-admin"]
    async with await anyio.open_process(argv, env={"VLLM_API_KEY": "sekret", "PATH": "/usr/bin:/bin"},
                                        stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        seen = b""
        with anyio.fail_after(30):
            while not (m := re.search(rb"http://127\.0\.0\.1:\d+", seen)):
                seen += await proc.stdout.receive()
        assert b"sim_flags_ignored" in seen
        try:
            yield m.group().decode()
        finally:
            proc.terminate()


@pytest.mark.slow
async def test_served_with_vllm_flags_env_key_and_root_path(served: str) -> None:
    async with httpx.AsyncClient(base_url=served) as http:
        assert (await http.get("/llm/v1/models")).status_code == 401
        auth = {"Authorization": "Bearer sekret", "X-Request-Id": "abc-123"}
        for prefix in ("/llm", ""):
            r = await http.post(f"{prefix}/v1/chat/completions", headers=auth,
                                json={"model": "alias", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == "abc-123"
            assert r.json()["id"] == "chatcmpl-abc-123"
            assert r.json()["model"] == "agent-llm"
        spec = (await http.get("/llm/openapi.json")).json()
        assert spec["servers"] == [{"url": "/llm"}]
        assert "/v1/chat/completions" in spec["paths"]
        assert (await http.get("/_sim/state")).status_code == 401  # admin needs the key too
        state = (await http.get("/_sim/state", headers=auth)).json()
        assert "--enforce-eager" in state["config"]["ignored_flags"]
        assert "sekret" not in json.dumps(state)
        assert json.dumps(state)
