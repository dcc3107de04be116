"""How to reach the API server (a kubeconfig or the pod's service account), and refs.

The ``kubernetes`` client is imported inside the functions, so file mode never pays for it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KubeError

if TYPE_CHECKING:
    from kubernetes.aio.client import Configuration

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # an RFC 1123 label
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # an RFC 1123 subdomain


def parse_ref(ref: str) -> tuple[str | None, str]:
    """``"[NAMESPACE/]NAME"`` -> ``(namespace or None, name)``; ValueError if malformed."""
    namespace, _, name = ref.rpartition("/")
    if "/" in namespace or (_ and not _NAMESPACE.match(namespace)):
        raise ValueError(f"invalid namespace in {ref!r}: expected [NAMESPACE/]NAME")
    if not _NAME.match(name):
        raise ValueError(f"invalid name in {ref!r}: expected a lowercase RFC 1123 name")
    return (namespace or None), name


_LABEL_KEY = r"(?:[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"!?\s*{_LABEL_KEY}"  # key, !key
    rf"|{_LABEL_KEY}\s*(?:==|=|!=)\s*{_LABEL_VALUE}"  # key=value, key!=value
    rf"|{_LABEL_KEY}\s+(?:in|notin)\s*\(\s*{_LABEL_VALUE}(?:\s*,\s*{_LABEL_VALUE})*\s*\)"  # key in (a,b)
)


def check_label_selector(selector: str) -> str:
    """A label selector (kubectl's ``-l``), stripped; ValueError if malformed or empty.

    The API server would reject a malformed one with a 400 on every retry; checked here, a
    typo fails at start. An empty one is refused: it would select every ConfigMap.
    """
    selector = selector.strip()
    if not selector:
        raise ValueError("empty label selector: it would select every ConfigMap")
    for term in re.split(r",(?![^()]*\))", selector):  # commas outside (a,b)
        if not _REQUIREMENT.fullmatch(term.strip()):
            raise ValueError(f"invalid label selector {selector!r}: cannot parse {term.strip()!r}")
    return selector


@dataclass(frozen=True)
class KubeConfig:
    """How to reach the API server, and the namespace a bare NAME refers to."""

    configuration: Configuration  # the client's settings: host, credentials, TLS
    namespace: str
    source: str  # "in-cluster" or the kubeconfig path(s), for log lines


async def load_config(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    service_account: Path = SERVICE_ACCOUNT_DIR,
) -> KubeConfig:
    """Load client settings; the first of these that applies wins:

    1. ``kubeconfig`` (the ``--kubeconfig PATH`` flag);
    2. in a pod (``KUBERNETES_SERVICE_HOST`` set, a service-account token mounted): the
       pod's service account;
    3. ``$KUBECONFIG`` (a ``:``-separated list, merged as kubectl merges it);
    4. ``~/.kube/config``.

    The default namespace comes with the credentials: in a pod, the pod's own namespace
    (the service account's ``namespace`` file); from a kubeconfig, its current context's
    namespace; else ``default``.
    """
    in_pod = bool(environ.get("KUBERNETES_SERVICE_HOST")) and (service_account / "token").exists()
    if kubeconfig is None and in_pod:
        return _load_in_cluster(environ, service_account)
    path = os.fspath(kubeconfig or environ.get("KUBECONFIG") or Path.home() / ".kube/config")
    return await _load_kubeconfig(path)


def _load_in_cluster(environ: Mapping[str, str], service_account: Path) -> KubeConfig:
    from kubernetes.aio.client import Configuration
    from kubernetes.aio.config import ConfigException
    from kubernetes.aio.config.incluster_config import InClusterConfigLoader

    configuration = Configuration()
    # The client's config loaders are untyped, hence the ignores on their calls.
    loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
        token_filename=str(service_account / "token"),
        cert_filename=str(service_account / "ca.crt"),
        environ=environ,  # it re-reads the token file: bound tokens rotate hourly
    )
    try:
        loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
    except ConfigException as exc:
        raise KubeError(f"cannot use the pod's service account: {exc}") from exc
    namespace_file = service_account / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else ""
    return KubeConfig(configuration, namespace or "default", "in-cluster")


async def _load_kubeconfig(path: str) -> KubeConfig:
    from kubernetes.aio.client import Configuration
    from kubernetes.aio.config import ConfigException, load_kube_config

    if not _any_exists(path):
        raise KubeError(f"no kubeconfig at {path}: pass --kubeconfig or set $KUBECONFIG")
    configuration = Configuration()
    try:
        # persist_config=False: never write refreshed tokens back into the user's file.
        loader = await load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=configuration, persist_config=False
        )
    except (ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
        raise KubeError(f"cannot load kubeconfig {path}: {exc}") from exc
    context = loader.current_context.get("context") or {}
    return KubeConfig(configuration, context.get("namespace") or "default", path)


def _any_exists(paths: str) -> bool:
    return any(os.path.exists(os.path.expanduser(p)) for p in paths.split(os.pathsep) if p)
