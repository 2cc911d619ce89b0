"""``orchestrator fleet up | status | render``: the command-line glue (signals live here)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from orchestrator.fleet.keys import KeyShares, ensure_keyring, hand_out
from orchestrator.fleet.manifest import FleetManifest, load_manifest
from orchestrator.fleet.preflight import check_processes
from orchestrator.fleet.render import dump_documents, render_compose, render_kubernetes_files
from orchestrator.fleet.supervisor import Supervisor, _take_lock, default_state_file, lock_file, read_state
from orchestrator.keys_cli import add_keys_flags
from protocol.errors import ConfigError
from protocol.keyring import keys_dir

__all__ = ("add_fleet_parser",)

HEADER = "# Rendered by `orchestrator fleet render {source} --target {target}`; edit the manifest, not this file.\n"


def add_fleet_parser(verbs: Any) -> None:
    """Add ``fleet`` and its sub-verbs to the CLI's sub-parsers."""
    fleet = verbs.add_parser("fleet", help="run a fleet from a manifest here, or render it for Kubernetes/compose")
    sub = fleet.add_subparsers(dest="fleet_verb", required=True, parser_class=type(fleet))

    up = sub.add_parser("up", help="start and supervise the manager and every worker replica on this machine")
    up.add_argument("manifest", help="fleet manifest (YAML), e.g. deploy/fleet.yaml")
    up.add_argument("--log-dir", type=Path, default=None, help="write each process's output to DIR/NAME.log "
                                                                "instead of streaming it with a [NAME] prefix")
    up.add_argument("--state-file", type=Path, default=None,
                    help="where to write the fleet's state (default .orchestrator/fleet-NAME.json)")
    up.add_argument("--child-log-level", default="INFO", help="--log-level of the processes (default INFO)")
    add_keys_flags(up)  # --keys DIR: the keyring fleet up makes or completes, and hands out; --insecure: none
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="list the fleet's processes: pid, capability, state, restarts")
    status.add_argument("manifest", nargs="?", default=None,
                        help="the manifest, to find its state file (default: the only .orchestrator/fleet-*.json)")
    status.add_argument("--state-file", type=Path, default=None, help="the state file `fleet up` writes")
    status.add_argument("--json", action="store_true", help="print the state as one JSON object")
    status.set_defaults(func=cmd_status)

    render = sub.add_parser("render", help="print Kubernetes objects or a compose file for the manifest")
    render.add_argument("manifest", help="fleet manifest (YAML)")
    render.add_argument("--target", required=True, choices=("kubernetes", "compose"))
    render.add_argument("--output", type=Path, default=None, metavar="DIR",
                        help="write files into DIR (kubernetes: one file per component; compose: compose.yaml)")
    render.add_argument("--keys", type=Path, default=None, metavar="DIR",
                        help="the fleet's keyring (made or completed like fleet up does): kubernetes adds keys.yaml, "
                             "one Secret per role with its private key (keep it out of version control); compose "
                             "mounts the key files from DIR (default: the pods name Secrets NAME-keys-ROLE you "
                             "create, compose reads ./keys next to compose.yaml)")
    render.set_defaults(func=cmd_render)


def cmd_up(args: argparse.Namespace) -> int:
    """``fleet up``: check the manifest (plugins, Redis, LLM, every process's executable), then supervise
    until SIGINT/SIGTERM."""
    manifest = load_manifest(args.manifest)
    state_file = args.state_file or default_state_file(manifest.name)
    environ = dict(os.environ)
    if args.insecure:
        environ["ORCH_INSECURE"] = "1"  # every process runs unsigned, and says so in its log
    probe = Supervisor(manifest, state_file=state_file, environ=environ, child_log_level=args.child_log_level)
    check_processes(manifest, [p.spec for p in probe.processes], source=args.manifest)  # before any key is made
    _refuse_if_running(state_file, manifest.name)
    keys = None if args.insecure else _keys(manifest, keys_dir(args.keys), state_file.parent)
    supervisor = Supervisor(manifest, state_file=state_file, log_dir=args.log_dir, environ=environ,
                            child_log_level=args.child_log_level, manifest_path=args.manifest, keys=keys)
    check_processes(manifest, [p.spec for p in supervisor.processes], source=args.manifest)  # with their keys

    async def go() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, supervisor, tg.cancel_scope)
            code = await supervisor.run()
            tg.cancel_scope.cancel()
        return code

    return anyio.run(go)


def _refuse_if_running(state_file: Path, fleet: str) -> None:
    """Raise FleetAlreadyRunning when a supervisor holds this fleet's lock (the lock ``Supervisor.run`` takes).

    Checked before the key shares are rewritten, which would pull them from under the running fleet;
    the lock is released at once and taken for good by ``Supervisor.run``.
    """
    state_file.parent.mkdir(parents=True, exist_ok=True)
    os.close(_take_lock(lock_file(state_file), fleet))


def _keys(manifest: FleetManifest, ring_dir: Path, state_dir: Path) -> KeyShares:
    """Make or complete the fleet's keyring, and hand each role its share under ``STATE_DIR/fleet-NAME-keys``."""
    ring, added = ensure_keyring(manifest, ring_dir)
    if added:
        print(f"[fleet] keyring {ring_dir}: added keys for {', '.join(added)}", flush=True)  # noqa: T201 - CLI output
    return hand_out(manifest, ring, state_dir / f"fleet-{manifest.name}-keys")


async def _stop_on_signal(supervisor: Supervisor, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for _ in signals:
            count += 1
            if count == 1:
                supervisor.stop()  # drain: SIGTERM, grace period, SIGKILL
            else:
                scope.cancel()  # a second Ctrl-C: do not wait for the grace period


def _state_path(args: argparse.Namespace) -> Path:
    if args.state_file is not None:
        return Path(args.state_file)
    if args.manifest is not None:
        return default_state_file(load_manifest(args.manifest, plugins=False, services=False).name)
    found = sorted(Path(".orchestrator").glob("fleet-*.json"))
    if len(found) != 1:
        raise ConfigError("name the fleet: `orchestrator fleet status MANIFEST` or --state-file F "
                          f"({len(found)} state files in .orchestrator/)")
    return found[0]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_status(args: argparse.Namespace) -> int:
    """``fleet status``: read the state file; processes of a supervisor that is gone show as ``gone``."""
    path = _state_path(args)
    try:
        state = read_state(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: no fleet state ({exc}); is `orchestrator fleet up` running here?") from exc
    state["supervisor_alive"] = _alive(state.get("supervisor_pid"))
    if not state["supervisor_alive"]:
        for p in state["processes"]:
            if p["state"] not in ("stopped", "failed"):
                p["state"] = "gone"
    if args.json:
        print(json.dumps(state))  # noqa: T201 - the --json contract is stdout
        return 0
    age = time.time() - float(state.get("updated_at", 0))
    print(f"fleet {state['fleet']}  supervisor pid {state['supervisor_pid']} "  # noqa: T201 - CLI output
          f"({'running' if state['supervisor_alive'] else 'not running'}), updated {age:.0f}s ago")
    print(f"{'NAME':<28} {'PID':>8} {'CAPABILITY':<16} {'STATE':<10} {'RESTARTS':>8}  LAST ERROR")  # noqa: T201
    for p in state["processes"]:
        print(f"{p['name']:<28} {p['pid'] or '-':>8} {p['capability'] or '-':<16} {p['state']:<10} "  # noqa: T201
              f"{p['restarts']:>8}  {(p.get('last_error') or '')[:80]}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    """``fleet render``: print (or write) the rendered YAML; plugins are not loaded, services not checked."""
    manifest = load_manifest(args.manifest, plugins=False, services=False)
    header = HEADER.format(source=args.manifest, target=args.target)
    ring = None
    if args.keys is not None:
        ring, added = ensure_keyring(manifest, args.keys)
        if added:
            print(f"keyring {args.keys}: added keys for {', '.join(added)}", file=sys.stderr)  # noqa: T201
    if args.target == "kubernetes":
        files = {name: dump_documents(docs, header=header)
                 for name, docs in render_kubernetes_files(manifest, ring).items()}
    else:
        keys_path = "./keys"
        if args.keys is not None:  # compose reads secret files relative to the compose file
            keys_path = os.path.relpath(args.keys.absolute(), (args.output or Path.cwd()).absolute())
        compose = render_compose(manifest, ring=ring, keys_path=keys_path)
        files = {"compose.yaml": dump_documents([compose], header=header)}
    if args.output is None:
        sys.stdout.write("---\n".join(files.values()))
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.output / name).write_text(text)
    return 0
