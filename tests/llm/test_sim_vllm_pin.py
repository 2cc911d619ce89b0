"""orchestrator[vllm] pins vLLM 0.33, and every `vllm serve` command line the fleet builds is one 0.33 accepts."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from orchestrator.fleet.commands import vllm_command
from orchestrator.fleet.manifest import ServeSpec, load_manifest
from orchestrator.simulator._vllm_flags import VLLM_VERSION
from orchestrator.simulator.cli import config_from_args

ROOT = Path(__file__).resolve().parents[2]


def _accepted_by_vllm_033(argv: list[str]) -> None:
    assert argv[:2] == ["vllm", "serve"]
    config_from_args(argv[1:], env={})  # exits 2 on an option vLLM 0.33 does not have


def test_extra_pins_vllm_033() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert extra == ["vllm>=0.33,<0.34"]
    assert VLLM_VERSION.startswith("0.33.")


def test_fleet_up_command_line_matches_vllm_033() -> None:
    manifest = load_manifest(ROOT / "deploy" / "fleet.yaml", environ={}, plugins=False, services=False)
    serve = manifest.spec.llm.serve
    assert serve is not None
    _accepted_by_vllm_033(vllm_command(serve, served_model_name="agent-llm"))
    big = ServeSpec(model="Qwen/Qwen3-8B", gpus=4, args=("--max-model-len", "32k", "--enable-prefix-caching"))
    argv = vllm_command(big, served_model_name="agent-llm")
    assert "--tensor-parallel-size" in argv
    _accepted_by_vllm_033(argv)
    assert ServeSpec(model="m").image == "vllm/vllm-openai:v0.33.0"


def test_rendered_manifests_run_vllm_033() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["vllm"]
    assert compose["image"] == "vllm/vllm-openai:v0.33.0"
    _accepted_by_vllm_033([*compose["entrypoint"], *compose["command"]])
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "vllm.yaml").read_text()))
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "vllm/vllm-openai:v0.33.0"
    _accepted_by_vllm_033([*container["command"], *container["args"]])
