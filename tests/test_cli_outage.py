"""``--exit-after-s`` on ``orchestrator manager`` and ``worker``: the flag, its environment variable, bad values."""

from __future__ import annotations

import argparse

import pytest

from orchestrator.cli import _resolve_env, build_parser, main


def parse(args: list[str]) -> argparse.Namespace:
    """Parse as ``main`` does: options left at their ``ORCH_*`` default read the variable after parsing."""
    parsed = build_parser().parse_args(args)
    _resolve_env(parsed)
    return parsed


@pytest.mark.parametrize("verb", [["manager"], ["worker", "--capability", "echo"]])
def test_exit_after_s_defaults_to_none_and_reads_the_flag_or_the_environment(
        verb: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_EXIT_AFTER_S", raising=False)
    assert parse(verb).exit_after_s is None  # wait for Redis however long it takes
    assert parse([*verb, "--exit-after-s", "2.5"]).exit_after_s == 2.5
    monkeypatch.setenv("ORCH_EXIT_AFTER_S", "120")
    assert parse(verb).exit_after_s == 120.0
    assert parse([*verb, "--exit-after-s", "3"]).exit_after_s == 3.0  # the flag wins


def test_the_workers_old_flag_name_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_EXIT_AFTER_S", raising=False)
    args = parse(["worker", "--capability", "echo", "--retry-budget-s", "30"])
    assert args.exit_after_s == 30.0


def test_bad_values_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ORCH_EXIT_AFTER_S", "soon")
    assert main(["manager", "--redis", "redis://127.0.0.1:1/0"]) == 2
    assert "ORCH_EXIT_AFTER_S='soon'" in capsys.readouterr().err
    monkeypatch.delenv("ORCH_EXIT_AFTER_S")
    assert main(["worker", "--capability", "echo", "--redis", "redis://127.0.0.1:1/0", "--exit-after-s", "-1"]) == 2
    assert "--exit-after-s must be 0 or more seconds, got -1" in capsys.readouterr().err
