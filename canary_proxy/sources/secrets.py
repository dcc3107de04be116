"""TLS Secrets, followed through the API (list, then watch) into a ``TlsStore``.

One watch of ``kubernetes.io/tls`` Secrets, in every namespace or in one (the server filters
by ``type``: a cluster's other Secrets, Helm releases and tokens among them, never reach the
proxy). Only the fields a certificate needs are kept. While the API is unreachable nothing
changes: the certificates last loaded keep serving.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..certs import CERT_KEY, KEY_KEY, TLS_TYPE

if TYPE_CHECKING:
    from ..k8s import Backoff, KubeClient, ObjectEvent
    from ..tls_store import TlsStore

log = logging.getLogger(__name__)


async def follow_secrets(
    store: TlsStore,
    client: KubeClient,
    *,
    namespace: str | None,
    name: str | None = None,
    backoff: Backoff | None = None,
) -> None:
    """Feed ``store`` every change to the TLS Secrets in ``namespace`` (None: all), or to
    the one ``name``d, forever."""
    from ..k8s import DEFAULT_BACKOFF, Selector, watch_objects

    selector = Selector(namespace, name=name, resource="secrets", field_selector=f"type={TLS_TYPE}")
    batches = watch_objects(client, selector, backoff=backoff or DEFAULT_BACKOFF)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            store.secrets([_slim(event) for event in batch])


def _slim(event: ObjectEvent) -> tuple[tuple[str, str], Mapping[str, Any] | None]:
    if event.type == "DELETED":
        return event.key, None
    data = event.obj.get("data")
    data = data if isinstance(data, Mapping) else {}
    kept = {k: data[k] for k in (CERT_KEY, KEY_KEY) if k in data}
    return event.key, {"metadata": {"resourceVersion": event.resource_version}, "data": kept}
