"""Hostile YAML: exit 2 naming the file, fast and in bounded memory, for every command that reads one.

A 677-byte file of nested aliases ("billion laughs") took 3 GB and two minutes before it was killed;
deep nesting and invalid UTF-8 gave tracebacks and exit 1.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.integration.harness import ROOT

pytestmark = pytest.mark.timeout(120)

LAUGHS = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
BILLION_LAUGHS = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + LAUGHS + \
    "goal: laughs\ntasks: []\n"

FILES = {
    "billion-laughs": (BILLION_LAUGHS.encode(), "is too large: it expands to more than 1000000 values"),
    "deep": (b"goal: deep\ntasks: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "nests deeper than 100 levels"),
    "recursive": (b"goal: &g [*g]\ntasks: []\n", "has an alias inside the collection it refers to"),
    "bad-utf8": (b'goal: "caf\xe9"\ntasks: []\n', "is not valid UTF-8: byte 10 (b'\\xe9')"),
    "huge-int": (b"goal: g\ntasks: []\nbudget: {max_tasks: " + b"9" * 5000 + b"}\n", "not valid YAML"),
}

COMMANDS = {
    "run": ["run", "{file}"],
    "submit": ["submit", "{file}", "--redis", "redis://127.0.0.1:1/0"],
    "fleet-up": ["fleet", "up", "{file}"],
    "fleet-render": ["fleet", "render", "{file}", "--target", "kubernetes", "--out", "{out}"],
}


def _limit_memory() -> None:  # in the child: 1 GiB of address space is plenty for a refusal
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _args(command: str, path: Path, tmp_path: Path) -> list[str]:
    return [a.format(file=path, out=tmp_path / "out") for a in COMMANDS[command]]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", sorted(set(FILES) - {"billion-laughs"}))
def test_hostile_yaml_exits_2_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str,
                                              command: str) -> None:
    content, why = FILES[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(content)
    assert main(_args(command, path, tmp_path)) == 2
    stderr = capsys.readouterr().err
    assert f"{path}: " in stderr
    assert why in stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_billion_laughs_exits_2_naming_the_file_in_bounded_memory(tmp_path: Path, command: str) -> None:
    # In a child limited to 1 GiB of address space: the file must be refused, not expanded.
    content, why = FILES["billion-laughs"]
    path = tmp_path / "laughs.yaml"
    path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *_args(command, path, tmp_path)], cwd=ROOT,
                          capture_output=True, timeout=60, check=False, preexec_fn=_limit_memory)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert f"{path}: " in stderr
    assert why in stderr


def test_billion_laughs_is_small_and_refused_in_bounded_memory(tmp_path: Path) -> None:
    assert len(BILLION_LAUGHS) < 700  # the shape of the reported file: 10 ** 9 values from a few hundred bytes
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    # The CLI in a fresh interpreter that reports its own peak memory.
    probe = ("import resource, sys\nfrom orchestrator.cli import main\ncode = main(sys.argv[1:])\n"
             "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
             "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, "run", str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False, preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr
    peak_kib = int(proc.stderr.rsplit("peak_kib ", 1)[1].split()[0])
    assert peak_kib < 300 * 1024  # the interpreter and its imports: far below the 3 GB it took


def test_the_simulator_config_file_is_bounded_too(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(BILLION_LAUGHS)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sim-llm", "m", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                          preexec_fn=_limit_memory)
    assert proc.returncode == 2
    assert f"--config {str(path)!r}: the file is too large" in proc.stderr


def test_a_big_file_written_out_is_not_mistaken_for_an_expansion() -> None:
    # The value bound limits what aliases add, not what a person writes: a 100,000-task job is
    # about 22 MB and a million values, written out.
    from orchestrator.yaml_file import MAX_YAML_VALUES, load_bounded_yaml

    items = MAX_YAML_VALUES + 200_000
    assert load_bounded_yaml("[" + ",".join(["0"] * items) + "]") == [0] * items
    # ... while aliases may still not multiply it more than four times.
    with pytest.raises(Exception, match="expands to more than"):
        load_bounded_yaml("a: &a [" + ",".join(["0"] * 1000) + "]\nb: [" + ",".join(["*a"] * 1100) + "]")
