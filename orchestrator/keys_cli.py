"""``orchestrator keys init | add | list | retire | remove | export``, and the key flags other verbs share."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from orchestrator.trust import Trust, insecure_from_env, load_trust
from protocol.keyring import Keyring, keys_dir

__all__ = ("add_keys_flags", "add_keys_parser", "add_operator_flag", "trust_of")


def add_keys_flags(parser: argparse.ArgumentParser) -> None:
    """``--keys DIR`` and ``--insecure``, for every verb that talks to Redis."""
    parser.add_argument("--keys", default=None, metavar="DIR",
                        help="keyring directory (env ORCH_KEYS; default .orchestrator/keys)")
    parser.add_argument("--insecure", action="store_true", default=insecure_from_env(),
                        help="do not sign or check bus messages (env ORCH_INSECURE=1): anyone who can write to "
                             "Redis can then pose as any role")


def add_operator_flag(parser: argparse.ArgumentParser) -> None:
    """``--as NAME``: which operator key signs (needed only when the keyring holds several)."""
    parser.add_argument("--as", dest="as_name", default=None, metavar="NAME",
                        help="sign as operator NAME (env ORCH_OPERATOR; default: the keyring's only operator key)")


def trust_of(args: argparse.Namespace, signers: Sequence[str], *, what: str) -> Trust:
    return load_trust(args.keys, signers, insecure=args.insecure, what=what)


def add_keys_parser(verbs: Any) -> None:
    keys = verbs.add_parser("keys", help="create and list the keys that sign bus messages (see docs/security.md)")
    sub = keys.add_subparsers(dest="keys_verb", required=True, parser_class=type(keys))

    def flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--keys", default=None, metavar="DIR",
                       help="keyring directory (env ORCH_KEYS; default .orchestrator/keys)")
        return p

    init = flags(sub.add_parser("init", help="create a keyring with the manager's key and one operator key"))
    init.add_argument("--operator", default="admin", help="the first operator's name (default: admin)")
    init.set_defaults(func=_cmd_init)

    add = flags(sub.add_parser("add", help="add a key: 'worker CAPABILITY', 'operator NAME' or 'manager'"))
    add.add_argument("role", choices=("worker", "operator", "manager"))
    add.add_argument("name", nargs="?", default="", help="the worker's capability or the operator's name")
    add.add_argument("--rotate", action="store_true",
                     help="replace an existing key; its old public key stays accepted until 'keys retire'")
    add.set_defaults(func=_cmd_add)

    listing = flags(sub.add_parser("list", help="list the keyring's identities"))
    listing.add_argument("--json", action="store_true", help="print one JSON object with 'keys'")
    listing.set_defaults(func=_cmd_list)

    retire = flags(sub.add_parser("retire", help="stop accepting an identity's keys from before its last rotation"))
    retire.add_argument("identity", help="e.g. worker:echo, operator:alice, manager")
    retire.set_defaults(func=_cmd_retire)

    remove = flags(sub.add_parser("remove", help="forget an identity: its messages stop verifying"))
    remove.add_argument("identity")
    remove.set_defaults(func=_cmd_remove)

    export = flags(sub.add_parser("export", help="copy the public keyring plus only the named private keys to DEST "
                                                 "(one process's share)"))
    export.add_argument("dest", help="directory to create or update")
    export.add_argument("identity", nargs="+")
    export.set_defaults(func=_cmd_export)


def _ring(args: argparse.Namespace) -> Keyring:
    return Keyring.load(keys_dir(args.keys))


def _say(text: str) -> None:
    print(text)  # noqa: T201 - CLI output


def _cmd_init(args: argparse.Namespace) -> int:
    ring = Keyring.init(keys_dir(args.keys), operator=args.operator)
    _say(f"created keyring {ring.path} with keys for: {', '.join(ring)}")
    _say("next: 'orchestrator keys add worker CAPABILITY' for each capability your workers serve")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    ring = _ring(args)
    ident = ring.add(args.role, args.name, rotate=args.rotate)
    _say(f"{'rotated' if args.rotate else 'added'} {ident} in {ring.path}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    infos = _ring(args).infos()
    if args.json:
        _say(json.dumps({"keys": [i.to_dict() for i in infos]}))
        return 0
    for i in infos:
        extra = f"  (+{i.previous} previous)" if i.previous else ""
        _say(f"{i.identity:<32} {i.fingerprint}  {'private' if i.private else 'public '}  {i.created}{extra}")
    return 0


def _cmd_retire(args: argparse.Namespace) -> int:
    dropped = _ring(args).retire(args.identity)
    _say(f"{args.identity}: {dropped} previous key(s) no longer accepted")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    _ring(args).remove(args.identity)
    _say(f"removed {args.identity}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    share = _ring(args).export(args.dest, args.identity)
    print(f"exported {', '.join(args.identity)} to {share.path}", file=sys.stderr)  # noqa: T201
    return 0
