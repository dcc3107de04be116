"""Config from a Kubernetes ConfigMap, followed through the API (list, then watch).

The watch loop itself (relist on 410, backoff, dead-stream detection) lives in ``k8s``;
this module turns its events into the same ``RawConfig`` the file source yields. A
deleted ConfigMap or an unreachable API never replaces the last good config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator

from .file import RawConfig

log = logging.getLogger(__name__)


def raw_from_data(data: dict[str, str]) -> RawConfig:
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return RawConfig(digest, dict(data))


async def follow_configmap(ref: str, *, kubeconfig: str | None) -> AsyncIterator[RawConfig]:
    """Yield the ConfigMap's ``data`` each time it changes, forever (until cancelled)."""
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

    last_digest = None
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
                raw = raw_from_data(dict(event.data))
                if raw.digest == last_digest:
                    continue  # only annotations changed (a rollout's state): not a new config
                last_digest = raw.digest
                yield raw
