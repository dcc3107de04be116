"""Our Kubernetes errors, and the mapping to them from the client's and aiohttp's exceptions.

Callers only ever see ``KubeError`` and its subclasses: nothing outside this package
catches an ``ApiException`` or an aiohttp error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp  # the client is built on it; the proxy already depends on it


class KubeError(Exception):
    """A failed Kubernetes API call (or client setup). ``status`` is the HTTP status, if any."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # the Status object's reason, e.g. "Expired"
        self.retry_after = retry_after  # seconds the server asked us to wait (429, 503)


class NotFound(KubeError):
    """404: the object does not exist."""


class Conflict(KubeError):
    """409: a write carried a stale resourceVersion, or the object already exists."""


class Gone(KubeError):
    """410: the resourceVersion is too old to watch from; list again."""


class Unreachable(KubeError):
    """No usable answer: connection failure, timeout, 429 or 5xx (after any retries)."""


_BY_STATUS: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 410: Gone}


def error_from_status(
    status: int, body: str | bytes | None, headers: Mapping[str, str] | None = None
) -> KubeError:
    """Our error for an HTTP status and its body, ideally a Kubernetes ``Status`` object."""
    try:
        status_obj = json.loads(body or "{}")
    except ValueError:
        status_obj = None
    if not isinstance(status_obj, dict):
        status_obj = {"message": str(body)[:200]}
    return error_from_status_object(status_obj, status=status, headers=headers)


def error_from_status_object(
    obj: Mapping[str, Any], *, status: int | None = None, headers: Mapping[str, str] | None = None
) -> KubeError:
    code = status or int(obj.get("code") or 0)
    reason = str(obj.get("reason") or "")
    retriable = code == 429 or code >= 500
    cls = _BY_STATUS.get(code) or (Unreachable if retriable else KubeError)
    message = f"HTTP {code} {reason}: {obj.get('message', '')}".rstrip(": ")
    return cls(message, status=code, reason=reason, retry_after=_retry_after(headers))


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    value = (headers or {}).get("Retry-After", "")
    return float(value) if value.isdigit() else None  # the HTTP-date form is not used by k8s


def translate(exc: BaseException) -> KubeError | None:
    """Map a client or transport exception to ours; None for anything else (a bug)."""
    from kubernetes.aio.client.exceptions import ApiException

    if isinstance(exc, KubeError):
        return exc
    if isinstance(exc, ApiException):
        if not exc.status:  # raised by the client before any request was made
            return KubeError(f"kubernetes client error: {exc.reason}")
        return error_from_status(exc.status, exc.body, exc.headers)
    if isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
        return Unreachable(f"{type(exc).__name__}: {exc}")
    return None
