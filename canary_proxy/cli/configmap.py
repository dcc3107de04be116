"""``weight`` and ``get``: change and inspect a running fleet's config through its ConfigMap.

Exit codes: 0 done, 2 an invalid value or resulting config (the ConfigMap is untouched),
3 the ConfigMap is missing or the API is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import aiohttp
import yaml

from ..annotations import PREFIX
from ..config import ConfigError
from ..routes import parse_route
from ..runner import Exit, fail
from .args import KUBECONFIG_HELP, env_flag


class _Invalid(Exception):
    """Raised from inside the read-modify-write so that nothing is written."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def add_commands(sub: Any) -> None:
    weight = sub.add_parser("weight", help="set canary-weight in a ConfigMap (conflict-safe)")
    weight.add_argument("configmap", metavar="[NAMESPACE/]NAME")
    weight.add_argument("value", help="the new canary-weight, 0..canary-weight-total; decimals allowed")
    env_flag(weight, "--kubeconfig", metavar="FILE", help=KUBECONFIG_HELP)

    get = sub.add_parser("get", help="print a ConfigMap's config and rollout status")
    get.add_argument("configmap", metavar="[NAMESPACE/]NAME")
    get.add_argument(
        "--service", metavar="NAME", help="also ask each proxy replica behind this Service for its /config"
    )
    get.add_argument(
        "--admin-port",
        default="9090",
        metavar="PORT",
        help="the replicas' admin port, name or number [default: 9090]",
    )
    env_flag(get, "--kubeconfig", metavar="FILE", help=KUBECONFIG_HELP)


def cmd_weight(args: argparse.Namespace) -> int:
    return asyncio.run(_weight(args))


def cmd_get(args: argparse.Namespace) -> int:
    return asyncio.run(_get(args))


def with_weight(data: dict[str, str], value: str) -> dict[str, str]:
    """The new data, validated as a whole against the ConfigMap's own canary-weight-total."""
    new = {**data, "canary-weight": value}
    try:
        parse_route(new, name="configmap")  # a route's ConfigMap may carry host, path and name
    except ConfigError as exc:
        raise _Invalid(exc.errors) from None
    return new


async def _weight(args: argparse.Namespace) -> int:
    from ..k8s import KubeClient, KubeError, NotFound, load_config, parse_ref, update_configmap

    try:
        namespace, name = parse_ref(args.configmap)
        config = await load_config(args.kubeconfig)
    except Exception as exc:  # a malformed NAME, or a kubeconfig that cannot be loaded
        return fail(Exit.USAGE, [str(exc)])
    namespace = namespace or config.namespace
    value = str(args.value).strip()
    try:
        async with KubeClient(config) as client:
            state = await update_configmap(
                client, namespace, name, lambda data, notes: (with_weight(data, value), notes)
            )
    except _Invalid as exc:
        return fail(Exit.USAGE, exc.errors)
    except NotFound:
        return fail(Exit.UNAVAILABLE, [f"configmap {namespace}/{name} not found"])
    except KubeError as exc:
        return fail(Exit.UNAVAILABLE, [f"configmap {namespace}/{name}: {exc}"])
    total = state.data.get("canary-weight-total", "100")
    print(f"{namespace}/{name}: canary-weight {value} of {total} (resourceVersion {state.resource_version})")
    return Exit.OK


async def _get(args: argparse.Namespace) -> int:
    from ..k8s import KubeClient, KubeError, NotFound, load_config, parse_ref

    try:
        namespace, name = parse_ref(args.configmap)
        config = await load_config(args.kubeconfig)
    except Exception as exc:
        return fail(Exit.USAGE, [str(exc)])
    namespace = namespace or config.namespace
    try:
        async with KubeClient(config) as client:
            state = await client.get_configmap(namespace, name)
            report = _describe(namespace, name, state.data, state.annotations, state.resource_version)
            if args.service:
                port = int(args.admin_port) if str(args.admin_port).isdigit() else args.admin_port
                endpoints = await client.get_endpoints(namespace, args.service, port=port)
                report["replicas"] = await _replicas(endpoints, report.get("config"))
    except NotFound as exc:
        return fail(Exit.UNAVAILABLE, [f"not found: {exc}"])
    except KubeError as exc:
        return fail(Exit.UNAVAILABLE, [str(exc)])
    sys.stdout.write(yaml.safe_dump(report, sort_keys=False))
    return Exit.OK


def _describe(
    namespace: str, name: str, data: dict[str, str], annotations: dict[str, str], rv: str
) -> dict[str, Any]:
    report: dict[str, Any] = {"configmap": f"{namespace}/{name}", "resourceVersion": rv}
    try:
        route = parse_route(data, name=f"{namespace}/{name}")
        where = {} if route.catch_all else route.describe()  # a route's ConfigMap: where it applies
        report["config"] = {**where, **route.config.effective()}
    except ConfigError as exc:
        report["config"] = dict(data)
        report["errors"] = exc.errors
    report["rollout"] = {
        key.removeprefix(PREFIX): value
        for key, value in sorted(annotations.items())
        if key.startswith(PREFIX)
    }
    return report


async def _replicas(endpoints: list[tuple[str, int]], expected: Any) -> list[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(_replica(session, ip, port, expected) for ip, port in endpoints)))


async def _replica(session: aiohttp.ClientSession, ip: str, port: int, expected: Any) -> dict[str, Any]:
    host = f"[{ip}]" if ":" in ip else ip
    address = f"{host}:{port}"
    try:
        async with session.get(f"http://{address}/config") as r:
            if r.status != 200:
                return {"address": address, "error": f"HTTP {r.status}"}
            config = await r.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"address": address, "error": repr(exc)}
    return {
        "address": address,
        "canary-weight": config.get("canary-weight"),
        "in-sync": config == expected,
    }


HANDLERS = {"weight": cmd_weight, "get": cmd_get}
