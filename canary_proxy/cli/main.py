"""``canary-proxy``: parse the command line, run one command, exit with its code.

This is the only module that exits the process (the codes are ``runner.Exit``). Every
flag can also come from ``CANARY_PROXY_<FLAG>``; the command line wins.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..runner import Fatal, print_errors
from . import configmap, demo, ingress, rollout, routes, serve

Handler = Callable[[argparse.Namespace], int]
FAMILIES = (serve, routes, demo, configmap, ingress, rollout)  # in the order ``--help`` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary-proxy",
        description="Canary releases without a service mesh: a weighted, sticky reverse proxy.",
    )
    parser.add_argument("--version", action="version", version=f"canary-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.add_commands(sub)
    return parser


HANDLERS: dict[str, Handler] = {
    name: handler for family in FAMILIES for name, handler in family.HANDLERS.items()
}


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = HANDLERS[args.command](args)
    except Fatal as exc:
        print_errors(exc.errors)
        code = exc.code
    sys.exit(int(code))
