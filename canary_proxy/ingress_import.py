"""``import-ingress``: turn an ingress-nginx main Ingress and its canary Ingress into the
canary-proxy ConfigMaps that route the same way, one per route. Pure: manifests in,
ConfigMap text out.

The rules are Ingress mode's own (``ingress.routes_from_ingresses``): every rule path of the
main Ingress, and its defaultBackend, is a route with its ``host`` and ``path`` keys; the
canary Ingress attaches to the routes with the same host and path; the main Ingress's
timeouts are carried. Two things differ, because the output is a ConfigMap for
``serve --configmap``/``--configmap-selector`` rather than a live view of the cluster:
Services are reached by their DNS name (the manifests need not be at hand, and a cluster IP
in a file would go stale), and a backend that cannot be resolved is an error (exit 2).

Everything that cannot be carried over is reported, never dropped silently.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .ingress import IngressRoutes, routes_from_ingresses
from .ingress_annotations import BODY_SIZE, DEFAULT_PREFIX

PREFIX = DEFAULT_PREFIX + "/"
LABEL = "canary-proxy.io/import"  # every ConfigMap of one import: --configmap-selector LABEL=NAME
_CLASS = "import-ingress"  # both Ingresses are claimed whatever their class
_ERRORS = frozenset({"backend", "invalid"})  # reports that make the import fail (exit 2)


class ImportError_(ValueError):
    """The manifests cannot be converted (exit 2); ``errors`` says why."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class Result:
    namespace: str
    routes: list[dict[str, str]]  # each route's ConfigMap data, in the main Ingress's order
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
    if _is_canary(mains[0]):
        raise ImportError_(['the first Ingress is annotated canary: "true"; give the main Ingress first'])
    if not _is_canary(canaries[0]):
        raise ImportError_(['the second Ingress is not annotated nginx.ingress.kubernetes.io/canary: "true"'])
    namespace = str((mains[0].get("metadata") or {}).get("namespace") or "default")
    main, canary = (_claimed(i, namespace) for i in (mains[0], canaries[0]))
    given = list(services or []) + find(main_docs, "Service") + find(canary_docs, "Service")
    known = _by_dns(given, namespace, [("main", main), ("canary", canary)])
    result = routes_from_ingresses([main, canary], known, ingress_class=_CLASS)
    errors = [r.message for r in result.reported if r.kind in _ERRORS]
    if errors:
        raise ImportError_(errors)
    if not result.routes:
        raise ImportError_(["the main Ingress has no backend"])
    return Result(namespace, [dict(r.data) for r in result.routes], _warnings(result))


def _is_canary(ingress: Mapping[str, Any]) -> bool:
    annotations = (ingress.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(PREFIX + "canary", "")).lower() == "true"


def _claimed(ingress: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    """A copy in ``networking.k8s.io/v1`` form, in the main Ingress's namespace, of our class."""
    copied = copy.deepcopy(dict(ingress))
    copied["metadata"] = {**(copied.get("metadata") or {}), "namespace": namespace}
    spec = copied["spec"] = dict(copied.get("spec") or {})
    spec["ingressClassName"] = _CLASS
    if "backend" in spec:  # extensions/v1beta1
        spec["defaultBackend"] = _v1_backend(spec.pop("backend"))
    for rule in spec.get("rules") or []:
        for path in (rule.get("http") or {}).get("paths") or []:
            path["backend"] = _v1_backend(path.get("backend") or {})
    return copied


def _v1_backend(backend: Mapping[str, Any]) -> Mapping[str, Any]:
    if "serviceName" not in backend:
        return backend
    port = backend.get("servicePort", "")
    key = "number" if isinstance(port, int) or str(port).isdigit() else "name"
    return {
        "service": {"name": backend["serviceName"], "port": {key: int(port) if key == "number" else port}}
    }


def _by_dns(
    given: list[Mapping[str, Any]], namespace: str, ingresses: list[tuple[str, Mapping[str, Any]]]
) -> list[Mapping[str, Any]]:
    """The Services the Ingresses name, headless (so reached by DNS name); a numbered port
    needs no manifest, a named one does."""
    known: dict[str, dict[str, Any]] = {}
    for service in given:
        meta = service.get("metadata") or {}
        if str(meta.get("namespace") or namespace) == namespace and meta.get("name"):
            ports = (service.get("spec") or {}).get("ports") or []
            known[str(meta["name"])] = _headless(str(meta["name"]), namespace, list(ports))
    for role, ingress in ingresses:
        for ref in _service_refs(ingress):
            name, port = str(ref.get("name", "")), ref.get("port") or {}
            number, port_name = port.get("number"), port.get("name")
            if name in known and (number or any(p.get("name") == port_name for p in _ports(known[name]))):
                continue
            if number:
                known.setdefault(name, _headless(name, namespace, []))["spec"]["ports"].append(
                    {"port": number}
                )
            elif port_name:
                raise ImportError_(
                    [
                        f"the {role} Ingress uses the named port {port_name!r} of Service {name}, "
                        "which cannot be resolved: pass the Service manifest too (--service FILE) "
                        "or use a port number"
                    ]
                )
    return list(known.values())


def _headless(name: str, namespace: str, ports: list[Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {"clusterIP": "None", "ports": ports}}


def _ports(service: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(service["spec"]["ports"])


def _service_refs(ingress: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = ingress.get("spec") or {}
    backends = [
        p.get("backend") or {}
        for r in spec.get("rules") or []
        for p in (r.get("http") or {}).get("paths") or []
    ]
    backends.append(spec.get("defaultBackend") or {})
    return [b["service"] for b in backends if isinstance(b.get("service"), Mapping)]


def _warnings(result: IngressRoutes) -> list[str]:
    warnings = [r.message for r in result.reported]
    warnings += [f"annotation {i.annotation}: not carried over: {i.reason}" for i in result.ignored]
    if any(r.body_limit is not None for r in result.routes):
        warnings.append(
            f"annotation {PREFIX}{BODY_SIZE}: not carried over: a route has no body limit of its own "
            "yet; serve --max-body-size sets one for the whole proxy"
        )
    return warnings


def render(result: Result, *, name: str) -> str:
    """One ConfigMap per route (``NAME`` for one, ``NAME-N`` for the Nth of several), every
    string value double-quoted (so "yes" stays a string)."""
    documents = []
    for number, data in enumerate(result.routes, 1):
        lines = [
            "apiVersion: v1",
            "kind: ConfigMap",
            "metadata:",
            f"  name: {json.dumps(name if len(result.routes) == 1 else f'{name}-{number}')}",
            f"  namespace: {json.dumps(result.namespace)}",
            "  labels:",
            f"    {LABEL}: {json.dumps(name)}",
            "data:",
        ]
        lines += [f"  {key}: {json.dumps(value)}" for key, value in data.items()]
        documents.append("\n".join(lines) + "\n")
    return "---\n".join(documents)
