"""``routes`` (the route table of a config) and ``route-for`` (which route and version a
request would get, and why): both read the config as ``serve`` would, and send nothing."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..runner import Exit, Fatal
from .args import KUBECONFIG_HELP, env_flag

if TYPE_CHECKING:
    from ..control import Routes
    from ..routes import Route
    from ..sources.raw import RawConfig

ROUTES_EXAMPLE = """\
example:
  canary-proxy routes --config-dir routes/
"""
ROUTE_FOR_EXAMPLE = """\
example:
  canary-proxy route-for http://shop.example.com/api/cart -H 'X-Canary: always' --config-dir routes/
"""


def add_commands(sub: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    table = sub.add_parser(
        "routes",
        help="print the route table of a config: host, path, type, stable, canary, weight, rules",
        description="Print every route a config defines, which one wins a conflict, and why a "
        "route is not served. Exit 2 if any route is invalid.",
        epilog=ROUTES_EXAMPLE,
        formatter_class=raw,
    )
    _source_flags(table)
    explain = sub.add_parser(
        "route-for",
        help="explain which route and version a request would get, and why",
        description="Explain, for one request, which route takes it (each candidate in the order "
        "the proxy tries them) and which version (header, cookie, sticky bucket or weight).",
        epilog=ROUTE_FOR_EXAMPLE,
        formatter_class=raw,
    )
    explain.add_argument("url", metavar="URL", help="the request: http://HOST[:PORT]/PATH[?QUERY]")
    explain.add_argument(
        "-H",
        "--header",
        dest="headers",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header (Host, the canary header, Cookie...); may repeat",
    )
    _source_flags(explain)


def _source_flags(parser: argparse.ArgumentParser) -> None:
    env_flag(parser, "--config", metavar="FILE", help="YAML config file (one route per document)")
    env_flag(parser, "--config-dir", metavar="DIR", help="every *.yaml in DIR, one route each")
    env_flag(
        parser,
        "--configmap-selector",
        metavar="KEY=VALUE[,...]",
        help="the ConfigMaps this label selector matches, read once from the API",
    )
    env_flag(
        parser,
        "--namespace",
        metavar="NAMESPACE",
        help="with --configmap-selector (default: the kubeconfig's)",
    )
    parser.add_argument(
        "--all-namespaces", action="store_true", help="with --configmap-selector: every namespace"
    )
    env_flag(parser, "--kubeconfig", metavar="FILE", help=KUBECONFIG_HELP)


def _load(args: argparse.Namespace) -> Routes:
    """The routes of the source, as ``serve`` would take them; the invalid ones are listed
    on stderr (and make the exit code 2), the valid ones are still shown."""
    from ..config import ConfigError
    from ..control import load_each
    from ..sources.file import load_dir, load_file

    sources = [args.config, args.config_dir, args.configmap_selector]
    if sum(bool(s) for s in sources) != 1:
        raise Fatal(Exit.USAGE, "exactly one of --config, --config-dir and --configmap-selector is required")
    if args.configmap_selector:
        raw = _read_selector(args)
    else:
        raw = load_file(args.config) if args.config else load_dir(args.config_dir)
    try:
        routes = load_each(raw, origin=args.config or args.config_dir or args.configmap_selector)
    except ConfigError as exc:
        raise Fatal(Exit.USAGE, *exc.errors) from None
    for rejected in routes.rejected:
        for line in rejected.errors:
            print(f"error: {rejected.name}: {line}", file=sys.stderr)
    return routes


def _read_selector(args: argparse.Namespace) -> RawConfig:
    """The matching ConfigMaps, once: the first list of the watch ``serve`` runs."""
    from ..k8s import check_label_selector, load_config
    from ..sources.configmap import follow_configmap_selector

    try:
        check_label_selector(args.configmap_selector)
    except ValueError as exc:
        raise Fatal(
            Exit.USAGE, f"--configmap-selector: invalid value {args.configmap_selector!r}; expected {exc}"
        ) from None

    async def first() -> RawConfig:
        config = await load_config(args.kubeconfig)
        namespace = None if args.all_namespaces else (args.namespace or config.namespace)
        updates = follow_configmap_selector(
            args.configmap_selector, namespace=namespace, kubeconfig=args.kubeconfig
        )
        try:
            async with asyncio.timeout(30):
                return await anext(updates)
        finally:
            await updates.aclose()  # type: ignore[attr-defined]  # it is an async generator

    try:
        return asyncio.run(first())
    except TimeoutError:
        raise Fatal(
            Exit.UNAVAILABLE, "--configmap-selector: the Kubernetes API did not answer in 30 s"
        ) from None


def _rules(route: Route) -> str:
    config = route.config
    rules = []
    if config.canary_by_header:
        match = config.canary_by_header_value or config.canary_by_header_pattern or "always|never"
        rules.append(f"header {config.canary_by_header}={match}")
    if config.canary_by_cookie:
        rules.append(f"cookie {config.canary_by_cookie}")
    if config.canary_mirror_percent:
        rules.append(f"mirror {config.canary_mirror_percent:g}%")
    return ", ".join(rules) or "-"


def cmd_routes(args: argparse.Namespace) -> int:
    routes = _load(args)
    served = {r.name for r in routes.table.routes}
    rows = [("NAME", "HOST", "PATH", "TYPE", "STABLE", "CANARY", "WEIGHT", "RULES")]
    for route in routes.routes:
        config = route.config
        weight = f"{config.canary_weight:g}/{config.canary_weight_total}"
        name = route.name if route.name in served else f"{route.name} (conflict: not served)"
        rows.append((name, route.host or "*", route.path, route.path_type, config.stable.url,
                     config.canary.url, weight, _rules(route)))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for message in routes.messages():
        print(f"warning: {message}", file=sys.stderr)
    return Exit.USAGE if routes.rejected else Exit.OK


def cmd_route_for(args: argparse.Namespace) -> int:
    from ..config import BUCKETS
    from ..proxy.headers import cookie_value
    from ..router import decide
    from ..routes import request_host, request_path

    routes = _load(args)
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise Fatal(Exit.USAGE, f"URL: invalid value {args.url!r}; expected http://HOST[:PORT]/PATH")
    headers: dict[str, str] = {}
    for line in args.headers:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise Fatal(Exit.USAGE, f"-H: invalid value {line!r}; expected 'NAME: VALUE'")
        headers[name.strip().lower()] = value.strip()
    host = headers.get("host", url.netloc).encode()
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    wanted, path = request_host(host), request_path(target.encode())
    for line in routes.table.explain(wanted, path):
        print(f"  {line}")
    found = routes.table.lookup(wanted, path)
    if found is None:
        print(f"no route for host {host.decode()} path {target}: 404 (or --default-backend)")
        return Exit.OK
    route = found[0]
    config = route.config
    cookies = headers.get("cookie", "").encode() or None
    kwargs: dict[str, Any] = {
        "header": headers.get(config.canary_by_header.lower()) if config.canary_by_header else None,
        "cookie": cookie_value(cookies, config.canary_by_cookie) if config.canary_by_cookie else None,
        "sticky": cookie_value(cookies, config.sticky_cookie),
    }
    low, high = decide(config, draw=lambda: 0, **kwargs), decide(config, draw=lambda: BUCKETS - 1, **kwargs)
    print(f"route: {route.name} (host {route.host or '*'}, {route.path_type} {route.path})")
    if low.version == high.version:
        print(f"version: {low.version}, by the {low.rule} rule")
    else:
        print(f"version: by the weight: canary with probability {config.weight_ratio:.2%}, else stable "
              f"(a sticky cookie {config.sticky_cookie} then keeps the user there)")  # fmt: skip
    print(f"upstream: stable {config.stable.url}, canary {config.canary.url}")
    return Exit.OK


HANDLERS = {"routes": cmd_routes, "route-for": cmd_route_for}
