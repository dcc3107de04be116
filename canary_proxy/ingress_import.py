"""``import-ingress``: turn an ingress-nginx main Ingress and its canary Ingress into the
canary-proxy ConfigMap that routes the same way. Pure: manifests in, ConfigMap text out.

Everything that cannot be carried over is reported, never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError, parse_config

PREFIX = "nginx.ingress.kubernetes.io/"
# ingress-nginx canary annotation -> our key. The names are the same on purpose.
CARRIED = {
    "canary-weight": "canary-weight",
    "canary-weight-total": "canary-weight-total",
    "canary-by-header": "canary-by-header",
    "canary-by-header-value": "canary-by-header-value",
    "canary-by-header-pattern": "canary-by-header-pattern",
    "canary-by-cookie": "canary-by-cookie",
}
_REASONS = {
    "affinity": "canary-proxy keeps users sticky with its own bucket cookie (sticky-cookie)",
    "session-cookie-name": "canary-proxy keeps users sticky with its own bucket cookie (sticky-cookie)",
    "session-cookie-max-age": "set sticky-max-age instead",
    "session-cookie-expires": "set sticky-max-age instead",
    "session-cookie-path": "the sticky cookie always has Path=/",
    "mirror-target": (
        "ingress-nginx mirrors to any URL; canary-proxy mirrors only to the canary: set "
        "canary-mirror-percent (and canary-mirror-max-body) if that is what it was for"
    ),
    "mirror-request-body": "canary-proxy mirrors bodies up to canary-mirror-max-body (default 64KiB)",
    "mirror-host": "a mirror copy keeps the request's Host and adds X-Canary-Mirror: 1",
    "canary-by-header-value-pattern": (
        "not an ingress-nginx annotation; did you mean canary-by-header-pattern?"
    ),
}
_DEFAULT_REASON = (
    "applies to the canary Ingress itself, which canary-proxy replaces; move it to the main "
    "Ingress if it should apply to all traffic"
)


class ImportError_(ValueError):
    """The manifests cannot be converted (exit 2); ``errors`` says why."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class Result:
    namespace: str
    data: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def find(documents: Iterable[Any], kind: str) -> list[Mapping[str, Any]]:
    return [d for d in documents if isinstance(d, Mapping) and d.get("kind") == kind]


def convert(
    main_docs: list[Any], canary_docs: list[Any], *, services: list[Mapping[str, Any]] | None = None
) -> Result:
    """Both inputs are lists of YAML documents; Services among them resolve named ports."""
    mains, canaries = find(main_docs, "Ingress"), find(canary_docs, "Ingress")
    if len(mains) != 1 or len(canaries) != 1:
        raise ImportError_(["expected exactly one Ingress in each file (the main one, then the canary)"])
    main, canary = mains[0], canaries[0]
    if _annotations(main).get(PREFIX + "canary", "").lower() == "true":
        raise ImportError_(['the first Ingress is annotated canary: "true"; give the main Ingress first'])
    if _annotations(canary).get(PREFIX + "canary", "").lower() != "true":
        raise ImportError_(['the second Ingress is not annotated nginx.ingress.kubernetes.io/canary: "true"'])
    known_services = list(services or []) + find(main_docs, "Service") + find(canary_docs, "Service")
    namespace = str(main.get("metadata", {}).get("namespace") or "default")
    warnings: list[str] = []
    data = {
        "stable-url": _url(main, namespace, known_services, warnings, role="main"),
        "canary-url": _url(canary, namespace, known_services, warnings, role="canary"),
    }
    data.update(_carry(canary, warnings))
    _compare_hosts(main, canary, warnings)
    try:
        parse_config(data)
    except ConfigError as exc:
        raise ImportError_([f"the resulting config is invalid: {e}" for e in exc.errors]) from None
    return Result(namespace, data, warnings)


def _annotations(ingress: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (ingress.get("metadata", {}).get("annotations") or {}).items()}


def _carry(canary: Mapping[str, Any], warnings: list[str]) -> dict[str, str]:
    data: dict[str, str] = {}
    for key, value in sorted(_annotations(canary).items()):
        if not key.startswith(PREFIX):
            continue
        name = key.removeprefix(PREFIX)
        if name == "canary":
            continue
        if name in CARRIED:
            data[CARRIED[name]] = value
        else:
            warnings.append(f"annotation {key}: not carried over: {_REASONS.get(name, _DEFAULT_REASON)}")
    return data


def _paths(ingress: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(host, path, backend) for every rule path, then the default backend."""
    spec = ingress.get("spec") or {}
    found = []
    for rule in spec.get("rules") or []:
        for path in (rule.get("http") or {}).get("paths") or []:
            found.append((str(rule.get("host", "*")), str(path.get("path", "/")), path.get("backend") or {}))
    default = spec.get("defaultBackend") or spec.get("backend")
    if default:
        found.append(("*", "(default backend)", default))
    return found


def _url(
    ingress: Mapping[str, Any],
    namespace: str,
    services: list[Mapping[str, Any]],
    warnings: list[str],
    *,
    role: str,
) -> str:
    paths = _paths(ingress)
    if not paths:
        raise ImportError_([f"the {role} Ingress has no backend"])
    host, path, backend = paths[0]
    for extra_host, extra_path, extra in paths[1:]:
        name, port = _service_ref(extra)
        warnings.append(
            f"{role} Ingress: rule {extra_host} {extra_path} -> {name}:{port} not carried over: "
            f"canary-proxy fronts one stable and one canary Service (used {host} {path})"
        )
    name, port = _service_ref(backend)
    if not name:
        raise ImportError_(
            [f"the {role} Ingress backend is not a Service (resource backends are not supported)"]
        )
    number = port if isinstance(port, int) else _resolve_port(name, str(port), namespace, services, role)
    return f"http://{name}.{namespace}.svc.cluster.local:{number}"


def _service_ref(backend: Mapping[str, Any]) -> tuple[str, int | str]:
    service = backend.get("service")
    if isinstance(service, Mapping):  # networking.k8s.io/v1
        port = service.get("port") or {}
        return str(service.get("name", "")), port.get("number") or str(port.get("name", ""))
    port = backend.get("servicePort", "")  # extensions/v1beta1
    return str(backend.get("serviceName", "")), int(port) if str(port).isdigit() else str(port)


def _resolve_port(name: str, port: str, namespace: str, services: list[Mapping[str, Any]], role: str) -> int:
    for service in services:
        meta = service.get("metadata") or {}
        if meta.get("name") != name or str(meta.get("namespace") or namespace) != namespace:
            continue
        for entry in (service.get("spec") or {}).get("ports") or []:
            if entry.get("name") == port and isinstance(entry.get("port"), int):
                return int(entry["port"])
    raise ImportError_(
        [
            f"the {role} Ingress uses the named port {port!r} of Service {name}, which cannot be "
            f"resolved: pass the Service manifest too (--service FILE) or use a port number"
        ]
    )


def _compare_hosts(main: Mapping[str, Any], canary: Mapping[str, Any], warnings: list[str]) -> None:
    hosts = {p[0] for p in _paths(main)}, {p[0] for p in _paths(canary)}
    if hosts[0] != hosts[1]:
        warnings.append(
            f"the Ingresses serve different hosts ({sorted(hosts[0])} vs {sorted(hosts[1])}); "
            "canary-proxy splits whatever traffic the main Ingress sends it"
        )


def render(result: Result, *, name: str) -> str:
    """The ConfigMap manifest; every string value double-quoted (so "yes" stays a string)."""
    lines = [
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {json.dumps(name)}",
        f"  namespace: {json.dumps(result.namespace)}",
        "data:",
    ]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in result.data.items()]
    return "\n".join(lines) + "\n"
