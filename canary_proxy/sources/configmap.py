"""Config from a Kubernetes ConfigMap, followed through the API (list, then watch).

The watch loop itself (relist on 410, backoff, dead-stream detection) lives in ``k8s``;
this module turns its events into the same ``RawConfig`` the file source yields, with the
rollout's state (the ``canary-proxy.io/*`` annotations) alongside. A deleted ConfigMap or
an unreachable API never replaces the last good config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping

from ..annotations import recorded
from .raw import RawConfig

log = logging.getLogger(__name__)


def raw_from_data(data: dict[str, str], annotations: Mapping[str, str] | None = None) -> RawConfig:
    """The digest covers ``data`` only: a change to the annotations alone is the same config."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    notes = None if annotations is None else recorded(annotations)
    return RawConfig(digest, dict(data), annotations=notes)


async def follow_configmap(ref: str, *, kubeconfig: str | None) -> AsyncIterator[RawConfig]:
    """Yield the ConfigMap's ``data`` and rollout annotations each time either changes, forever
    (until cancelled). A change to the annotations alone keeps the digest, so the consumer
    (``control.ConfigControl``) updates the rollout it shows without reloading the config."""
    from ..k8s import KubeClient, WatchStatus, load_config, parse_ref, watch_configmap

    namespace, name = parse_ref(ref)
    config = await load_config(kubeconfig)
    namespace = namespace or config.namespace

    def on_status(status: WatchStatus) -> None:
        if status.state == "retrying":
            log.warning(
                "Kubernetes API unavailable for configmap %s/%s; keeping the last good config",
                namespace,
                name,
                extra={"error": str(status.error)},
            )

    last: RawConfig | None = None
    async with KubeClient(config) as client:
        events = watch_configmap(client, namespace, name, on_status=on_status)
        async with contextlib.aclosing(events):
            async for event in events:
                if event.type == "DELETED":
                    log.error(
                        "configmap %s/%s does not exist (deleted?); keeping the last good config",
                        namespace,
                        name,
                    )
                    continue
                raw = raw_from_data(dict(event.data), event.annotations)
                if last is not None and (raw.digest, raw.annotations) == (last.digest, last.annotations):
                    continue  # only labels or other tools' annotations changed
                last = raw
                yield raw
