"""Rollout webhooks, Flagger's model: gates that can hold or stop a rollout, and notifications.

``--webhook KIND=URL`` (repeatable). Each call POSTs one JSON object: ``name``,
``namespace``, ``phase``, ``step``, ``weight`` (the canary's percent of traffic),
``analysis`` (the last check, or null), plus ``kind`` and ``message``.

- ``pre-rollout``: called before anything is written; a non-2xx stops the rollout
  (RolledBack, no weight written, exit 1).
- ``pre-step``: called before the weight moves to the next step; a non-2xx holds the step
  (a load test or an acceptance test that must pass first). Asked again next interval.
- ``confirm-promotion``: called before the weight goes to 100 %; a non-2xx holds there.
- ``rollback``: called once when the rollout rolls back or is aborted; its answer is logged.
- ``event``: every phase change, fire-and-forget.

Each call has its own timeout and is retried (``--webhook-retries``, one second apart) on
a connection error, a timeout or a 5xx; a 4xx is an answer and is not retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger(__name__)

KINDS = ("pre-rollout", "pre-step", "confirm-promotion", "rollback", "event")
GATES = frozenset({"pre-rollout", "pre-step", "confirm-promotion"})


@dataclass(frozen=True, slots=True)
class Webhook:
    kind: str
    url: str


def parse_webhook(text: str) -> Webhook:
    """``KIND=URL``; ValueError with what was expected."""
    kind, sep, url = text.partition("=")
    if not sep or kind not in KINDS:
        raise ValueError(f"KIND=URL with KIND one of {', '.join(KINDS)}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an http(s) URL after {kind}=")
    return Webhook(kind, url)


@dataclass(frozen=True, slots=True)
class Answer:
    ok: bool
    detail: str  # "HTTP 503: body..." or the connection error


class Webhooks:
    """Calls the configured hooks; one aiohttp session for the rollout's lifetime."""

    def __init__(
        self,
        hooks: list[Webhook],
        *,
        name: str,
        namespace: str | None,
        timeout: float = 10.0,
        retries: int = 2,
    ) -> None:
        self.hooks = hooks
        self.name, self.namespace = name, namespace
        self.timeout, self.retries = timeout, retries
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()

    def has(self, kind: str) -> bool:
        return any(h.kind == kind for h in self.hooks)

    def payload(self, kind: str, *, phase: str | None, step: int, weight: float, analysis: str | None,
                message: str) -> dict[str, Any]:  # fmt: skip
        return {
            "name": self.name,
            "namespace": self.namespace,
            "phase": phase,
            "step": step,
            "weight": weight,
            "analysis": json.loads(analysis) if analysis else None,
            "kind": kind,
            "message": message,
        }

    async def gate(self, kind: str, payload: dict[str, Any]) -> Answer:
        """Every hook of ``kind`` must answer 2xx; the first that does not is the answer."""
        for hook in (h for h in self.hooks if h.kind == kind):
            answer = await self._call(hook, payload)
            log.info(
                "webhook %s %s: %s", kind, hook.url, answer.detail, extra={"webhook": kind, "ok": answer.ok}
            )
            if not answer.ok:
                return answer
        return Answer(True, "passed")

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        for hook in (h for h in self.hooks if h.kind == kind):
            answer = await self._call(hook, payload)
            level = logging.INFO if answer.ok else logging.WARNING
            log.log(level, "webhook %s %s: %s", kind, hook.url, answer.detail, extra={"webhook": kind})

    def fire(self, kind: str, payload: dict[str, Any]) -> None:
        """Fire-and-forget (``close`` waits a bounded time for these before exit)."""
        if not self.has(kind):
            return
        task = asyncio.get_running_loop().create_task(self.notify(kind, payload))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=self.timeout)
        for task in self._background:
            task.cancel()
        if self._session is not None:
            await self._session.close()

    async def _call(self, hook: Webhook, payload: dict[str, Any]) -> Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        answer = Answer(False, "not called")
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(1.0)
            try:
                async with self._session.post(hook.url, json=payload) as response:
                    body = (await response.text())[:200]
                    answer = Answer(200 <= response.status < 300, f"HTTP {response.status}: {body.strip()}")
                    if response.status < 500:
                        return answer  # an answer, right or wrong: retrying will not change it
            except (aiohttp.ClientError, TimeoutError) as exc:
                answer = Answer(False, f"no answer ({exc!r})")
        return answer
