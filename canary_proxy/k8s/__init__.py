"""The small Kubernetes API surface canary-proxy uses, with its own error types.

This package is the only place that talks to Kubernetes: ``errors`` (all that callers
catch), ``config`` (how to reach the API server), ``objects`` (selectors, objects as the API
shows them, a watch stream, backoff), ``client`` (the calls, with retries, and
read-modify-write), ``watch`` (list, then watch) and ``lease`` (leader election). It
imports the ``kubernetes`` client lazily, inside functions, so the proxy in file mode never
pays for it; and callers only ever see ``KubeError`` and its subclasses, never the client's
or aiohttp's exceptions.
"""

from .client import KubeClient, update_configmap
from .config import KubeConfig, check_label_selector, load_config, parse_ref
from .errors import Conflict, Gone, KubeError, NotFound, Unreachable
from .objects import DEFAULT_BACKOFF, Backoff, ConfigMapObject, ConfigMapState, Selector
from .watch import (
    Batch,
    ObjectBatch,
    ObjectEvent,
    OutageLog,
    WatchEvent,
    WatchState,
    WatchStatus,
    watch_configmap,
    watch_configmaps,
    watch_objects,
)

__all__ = [
    "DEFAULT_BACKOFF",
    "Backoff",
    "Batch",
    "ConfigMapObject",
    "ConfigMapState",
    "Conflict",
    "Gone",
    "KubeClient",
    "KubeConfig",
    "KubeError",
    "NotFound",
    "ObjectBatch",
    "ObjectEvent",
    "OutageLog",
    "Selector",
    "Unreachable",
    "WatchEvent",
    "WatchState",
    "WatchStatus",
    "check_label_selector",
    "load_config",
    "parse_ref",
    "update_configmap",
    "watch_configmap",
    "watch_configmaps",
    "watch_objects",
]
