"""The routing decision: (config, request header/cookies, random source) -> Decision. Pure, O(1).

Precedence, the same as ingress-nginx's canary annotations, so migrating users see no
surprise. Header and cookie values are compared exactly (case-sensitive):

1. ``canary-by-header``:
   a. with ``canary-by-header-value``: equal -> canary; anything else falls through
      (if ``-pattern`` is also set, ``-value`` wins and the pattern is ignored);
   b. else with ``canary-by-header-pattern``: a full match -> canary; else falls through;
   c. else ``always`` -> canary, ``never`` -> stable at once (no later rule applies);
      anything else falls through.
2. ``canary-by-cookie``: ``always`` -> canary, ``never`` -> stable; else falls through.
3. The weight, through a sticky bucket in 0..BUCKETS-1: the canary gets the request iff
   ``bucket < round(weight / total * BUCKETS)``. A valid sticky cookie supplies the bucket
   (rule ``sticky``); otherwise a random bucket is drawn (rule ``weight``).

Because the canary owns the *lowest* buckets, raising the weight only ever moves users
from stable to the canary, and two replicas agree on a user without sharing state.
Any request that did not carry a valid sticky cookie gets one (``set_cookie``) whichever
rule routed it, so the user keeps their bucket from then on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from .config import BUCKETS, Config

STABLE: Final = "stable"
CANARY: Final = "canary"
VERSIONS: Final = (STABLE, CANARY)
UNROUTED: Final = "none"  # the version (and route) label of a request no route took
DEFAULT_ROUTE: Final = "default"  # the name (and route label) of a lone catch-all route
RULES: Final = ("header", "cookie", "sticky", "weight", "failover")


@dataclass(frozen=True, slots=True)
class Decision:
    version: str  # STABLE or CANARY
    rule: str  # one of RULES
    bucket: int | None  # the user's bucket; None when stickiness is off
    set_cookie: bool  # send a sticky cookie with the response


def parse_bucket(value: str | None) -> int | None:
    """A sticky cookie is valid only if it is a plain decimal in 0..BUCKETS-1."""
    if value is None or not (0 < len(value) <= 4) or not value.isdigit() or not value.isascii():
        return None
    return int(value)


class Rules(Protocol):
    """What ``decide`` reads of a route's config: a Config, or the data path's Runtime, which
    keeps copies of these side by side (see proxy/exchange.Runtime)."""

    @property
    def sticky_cookie(self) -> str: ...
    @property
    def canary_buckets(self) -> int: ...
    @property
    def canary_by_header(self) -> str | None: ...
    @property
    def canary_by_header_value(self) -> str | None: ...
    @property
    def header_regex(self) -> re.Pattern[str] | None: ...
    @property
    def canary_by_cookie(self) -> str | None: ...


def decide(
    config: Rules,
    *,
    header: str | None,
    cookie: str | None,
    sticky: str | None,
    draw: Callable[[], int],
) -> Decision:
    """Route one request.

    ``header`` is the value of ``canary-by-header`` (None if absent), ``cookie`` the value of
    the ``canary-by-cookie`` cookie, ``sticky`` the value of the sticky cookie, and ``draw``
    returns a uniformly random bucket in 0..BUCKETS-1.
    """
    stickiness = config.sticky_cookie != ""
    kept = parse_bucket(sticky) if stickiness else None
    fresh = kept is None
    bucket = draw() if kept is None else kept
    set_cookie = stickiness and fresh
    keep = bucket if stickiness else None

    forced = _forced(config, header, cookie)
    if forced is not None:
        version, rule = forced
        return Decision(version, rule, keep, set_cookie)
    version = CANARY if bucket < config.canary_buckets else STABLE
    rule = "weight" if fresh else "sticky"
    return Decision(version, rule, keep, set_cookie)


MIRRORED_RULES: Final = frozenset({"weight", "sticky"})


def mirrored(config: Config, decision: Decision, draw: Callable[[], int]) -> bool:
    """Whether a copy of this request also goes to the canary (``canary-mirror-percent``).

    Only requests the *weight* sent to stable are mirrored (a sticky user's bucket is the
    weight's choice too); a request a header or cookie forced to stable, or one that failed
    over, is not. The draw is per request and independent of the user's bucket, so the
    mirrored share of each user's traffic is the same.
    """
    return (
        config.mirror_buckets > 0
        and decision.version == STABLE
        and decision.rule in MIRRORED_RULES
        and draw() < config.mirror_buckets
    )


def _forced(config: Rules, header: str | None, cookie: str | None) -> tuple[str, str] | None:
    if config.canary_by_header is not None and header is not None:
        if config.canary_by_header_value is not None:
            if header == config.canary_by_header_value:
                return CANARY, "header"
        elif config.header_regex is not None:
            if config.header_regex.fullmatch(header):
                return CANARY, "header"
        elif header == "always":
            return CANARY, "header"
        elif header == "never":
            return STABLE, "header"
    if config.canary_by_cookie is not None and cookie is not None:
        if cookie == "always":
            return CANARY, "cookie"
        if cookie == "never":
            return STABLE, "cookie"
    return None


def random_bucket_source() -> Callable[[], int]:
    """A fast uniform draw over the bucket space (not for secrets: the bucket is forgeable)."""
    import random

    rng = random.Random()
    return lambda: rng.randrange(BUCKETS)
