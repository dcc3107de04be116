"""``canary-proxy import-ingress MAIN.yaml CANARY.yaml``: print the equivalent ConfigMaps,
one per route (a multi-document YAML stream).

Exit codes: 0 printed (anything not carried over is listed on stderr), 2 the manifests
cannot be read or converted (e.g. a named port that no given Service resolves).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from ..ingress_import import ImportError_, convert, render
from ..runner import Exit, fail, print_errors


def add_commands(sub: Any) -> None:
    parser = sub.add_parser(
        "import-ingress",
        help="convert an ingress-nginx main + canary Ingress into canary-proxy ConfigMaps, one per route",
    )
    parser.add_argument("main", metavar="MAIN.yaml", help="the main Ingress (may also hold its Services)")
    parser.add_argument("canary", metavar="CANARY.yaml", help='the Ingress annotated canary: "true"')
    parser.add_argument(
        "--name",
        default="canary-proxy",
        metavar="NAME",
        help="the ConfigMap's name (NAME-N for the Nth of several routes) [default: canary-proxy]",
    )
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="FILE",
        help="Service manifests to resolve named ports",
    )


def _load(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def cmd_import_ingress(args: argparse.Namespace) -> int:
    try:
        main, canary = _load(args.main), _load(args.canary)
        services = [doc for path in args.service for doc in _load(path)]
        result = convert(main, canary, services=services)
    except (OSError, yaml.YAMLError) as exc:
        return fail(Exit.USAGE, [str(exc)])
    except ImportError_ as exc:
        return fail(Exit.USAGE, exc.errors)
    print_errors(result.warnings, label="warning")
    sys.stdout.write(render(result, name=args.name))
    return Exit.OK


HANDLERS = {"import-ingress": cmd_import_ingress}
