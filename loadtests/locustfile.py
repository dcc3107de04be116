"""Locust traffic for canary-proxy: browser, API and QA users, judged at the end (pass/fail).

Three kinds of users, as a canary sees them:

- ``BrowserUser`` keeps cookies, so its sticky cookie pins it to one version for the session.
  A session lasts ``CANARY_SESSION_REQUESTS`` requests (default 10), then the user clears
  its cookies and comes back as a new visitor. Any session that sees both versions is a flip.
- ``ApiUser`` sends no cookies: the proxy draws a fresh bucket for every request.
- ``QaUser`` sends the canary header and must always reach the canary.

Each response is classified by the version header. At the end the run reports and fails
(``environment.process_exit_code = 1``) on:

- the canary share of browser + API users, per configured weight, outside its bound (a
  Bernstein bound at delta = 1e-6 in which a sticky session counts once, being one bucket
  draw, and each API request once: see ``canary_checks.py`` for how and why it does not
  flake);
- any flip a weight change cannot explain (with a constant weight, any flip at all);
- any QA request not served by the canary (a header misroute);
- an error rate above ``CANARY_MAX_ERROR_RATE`` (default 0.01; a response without a
  valid version header is an error).

Configuration, from the environment:

``CANARY_PROXY_ADMIN_URL``  the proxy's admin URL. The weight, ``canary-weight-total``, the
    header name (``canary-by-header``) and value (``canary-by-header-value``, else
    ``always``), ``version-header`` and ``sticky-cookie`` come from its ``/config``, which is
    re-read every ``CANARY_POLL_INTERVAL`` seconds (0.5) so a weight change mid-run is
    followed. Without it the share check is skipped, the weight is taken as constant, and
    the names default to ``X-Canary`` / ``always`` / ``X-Canary-Version`` /
    ``canary_proxy_bucket`` (override with ``CANARY_HEADER``, ``CANARY_HEADER_VALUE``).
``CANARY_REPORT_FILE``  also write the report as JSON here.
``CANARY_MAX_REQUESTS``  stop after this many requests even if ``--run-time`` has not run out.
``CANARY_MIN_SHARE_USERS``  a weight seen by fewer users is reported, not judged (200).
``CANARY_SESSION_REQUESTS``  requests per browser session (10).

Run it with Locust's local runner (not ``--processes``/distributed: the counters live in
one process). Locust monkeypatches the standard library through gevent when imported, so it
always runs as its own process, never inside pytest or the proxy.

    CANARY_PROXY_ADMIN_URL=http://127.0.0.1:9090 locust -f loadtests/locustfile.py \
        --host http://127.0.0.1:8080 --headless -u 30 -r 30 --run-time 60s --json-file stats
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import gevent
from locust import FastHttpUser, between, events, task
from locust.env import Environment
from locust.runners import LocalRunner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from canary_checks import (  # the locustfile's folder is not a package
    CANARY,
    DEFAULT_DELTA,
    STABLE,
    Flip,
    PhaseStats,
    Poll,
    WeightHistory,
    summarize_flips,
)

log = logging.getLogger("canary-loadtest")

ADMIN_URL = os.environ.get("CANARY_PROXY_ADMIN_URL", "").rstrip("/")
POLL_INTERVAL = float(os.environ.get("CANARY_POLL_INTERVAL", "0.5"))
APPLY_SLACK = float(os.environ.get("CANARY_APPLY_SLACK", "0.5"))  # workers apply just after /config
MAX_ERROR_RATE = float(os.environ.get("CANARY_MAX_ERROR_RATE", "0.01"))
MIN_SHARE_USERS = int(os.environ.get("CANARY_MIN_SHARE_USERS", "200"))
SESSION_REQUESTS = int(os.environ.get("CANARY_SESSION_REQUESTS", "10"))
DELTA = float(os.environ.get("CANARY_SHARE_DELTA", str(DEFAULT_DELTA)))
MAX_REQUESTS = int(os.environ.get("CANARY_MAX_REQUESTS", "10000000"))  # with --run-time: bounded twice
MAX_FLIPS_KEPT = 100_000  # a badly broken proxy flips on every request: count, do not hoard


@dataclass(slots=True)
class Names:
    version_header: str = "X-Canary-Version"
    qa_header: str | None = "X-Canary"
    qa_value: str = "always"
    sticky_cookie: str = "canary_proxy_bucket"


@dataclass(slots=True)
class Observation:
    session: int | None  # None for an API request
    canary: bool
    sent: float
    received: float


@dataclass
class Tracker:
    """Everything the users report, attributed to a weight once the history has settled."""

    names: Names = field(default_factory=Names)
    history: WeightHistory | None = None
    pending: deque[Observation] = field(default_factory=deque)
    phases: dict[tuple[float, int], PhaseStats] = field(default_factory=dict)
    in_transition: int = 0
    flips: list[Flip] = field(default_factory=list)
    flips_dropped: int = 0
    qa_requests: int = 0
    qa_misroutes: int = 0
    next_session: int = 0
    poll_failures: int = 0
    poller: Any = None
    capped: bool = False  # stopped at MAX_REQUESTS before --run-time ran out

    def new_session(self) -> int:
        self.next_session += 1
        return self.next_session

    def observe(self, *, session: int | None, version: str, sent: float, received: float) -> None:
        self.pending.append(Observation(session, version == CANARY, sent, received))

    def flip(self, flip: Flip) -> None:
        if len(self.flips) < MAX_FLIPS_KEPT:
            self.flips.append(flip)
        else:
            self.flips_dropped += 1

    def commit(self, *, everything: bool = False) -> None:
        """Attribute settled observations to the weight in force when they were routed."""
        if self.history is None:
            self.pending.clear()  # no weight known: nothing to judge the share against
            return
        until = self.history.settled_until
        while self.pending and (everything or self.pending[0].received <= until):
            obs = self.pending.popleft()
            poll = self.history.share_between(obs.sent, obs.received)
            if poll is None:
                self.in_transition += 1
                continue
            key = (poll.weight, poll.total)
            phase = self.phases.get(key)
            if phase is None:
                phase = self.phases[key] = PhaseStats(poll.share, poll.weight, poll.total)
            phase.add(session=obs.session, canary=obs.canary)


TRACKER = Tracker()


def read_config() -> tuple[float, float, dict[str, Any]]:
    sent = time.monotonic()
    with urllib.request.urlopen(ADMIN_URL + "/config", timeout=5) as response:
        config = json.load(response)
    return sent, time.monotonic(), config


def poll_once() -> None:
    assert TRACKER.history is not None
    try:
        sent, received, config = read_config()
    except (OSError, ValueError) as exc:
        TRACKER.poll_failures += 1
        log.warning("cannot read %s/config: %s", ADMIN_URL, exc)
        return
    weight = float(config["canary-weight"])
    total = int(config["canary-weight-total"])
    if TRACKER.history.last is not None and weight != TRACKER.history.last.weight:
        log.info("weight changed: %s -> %s of %s", TRACKER.history.last.weight, weight, total)
    TRACKER.history.record(Poll(sent, received, weight, total))


def poll_forever() -> None:
    while True:
        gevent.sleep(POLL_INTERVAL)
        try:
            poll_once()
        except (KeyError, TypeError, ValueError) as exc:  # a /config without the keys we read
            TRACKER.poll_failures += 1
            log.warning("unexpected /config: %r", exc)
        TRACKER.commit()


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    if environment.runner is not None and not isinstance(environment.runner, LocalRunner):
        raise RuntimeError("this locustfile keeps its counters in one process: use the local runner")
    names = TRACKER.names
    if not ADMIN_URL:
        names.qa_header = os.environ.get("CANARY_HEADER", "X-Canary") or None
        names.qa_value = os.environ.get("CANARY_HEADER_VALUE", "always")
        log.warning("CANARY_PROXY_ADMIN_URL is not set: the share check is skipped")
        return
    config = read_config()[2]  # fail fast: a wrong admin URL is a broken run, not a skip
    names.version_header = config.get("version-header") or ""
    if not names.version_header:
        raise RuntimeError("the proxy's version-header is off: responses cannot be classified")
    names.qa_header = config.get("canary-by-header")
    value = config.get("canary-by-header-value")
    names.qa_value = os.environ.get("CANARY_HEADER_VALUE") or (value if value is not None else "always")
    if names.qa_header and value is None and config.get("canary-by-header-pattern"):
        if not os.environ.get("CANARY_HEADER_VALUE"):
            raise RuntimeError("canary-by-header-pattern is set: give CANARY_HEADER_VALUE, a matching value")
    names.sticky_cookie = config.get("sticky-cookie") or ""
    TRACKER.history = WeightHistory(apply_slack=APPLY_SLACK)
    poll_once()


@events.test_start.add_listener
def _test_start(environment: Environment, **_: Any) -> None:
    if TRACKER.history is not None and TRACKER.poller is None:
        TRACKER.poller = gevent.spawn(poll_forever)


# -- the users -------------------------------------------------------------------------------


def fetch(
    user: FastHttpUser, kind: str, path: str, *, headers: dict[str, str] | None = None, sticky: bool = False
) -> Any:
    """GET ``path``; returns (version, sent, received) for a good response, else None (a failure).

    ``sticky``: the response must also have left the sticky cookie in the user's jar."""
    sent = time.monotonic()
    names = TRACKER.names
    name = f"{kind} {path.split('?')[0]}"
    environment = user.environment
    if environment.stats.total.num_requests >= MAX_REQUESTS and not TRACKER.capped:
        TRACKER.capped = True
        log.warning("stopping at CANARY_MAX_REQUESTS=%d", MAX_REQUESTS)
        gevent.spawn(environment.runner.quit)
    with user.client.get(path, name=name, headers=headers, catch_response=True) as r:
        received = time.monotonic()
        if r.status_code == 0 or r.status_code >= 400:
            r.failure(f"status {r.status_code}")
            return None
        version = r.headers.get(names.version_header)
        if version not in (STABLE, CANARY):
            r.failure(f"no valid {names.version_header} header (got {version!r})")
            return None
        if sticky and not any(c.name == names.sticky_cookie for c in user.client.cookiejar):
            r.failure(f"no {names.sticky_cookie} cookie was set")
            return None
        r.success()
        return version, sent, received


class BrowserUser(FastHttpUser):
    """Keeps cookies, so its sticky cookie holds it to one version for the whole session."""

    weight = 3
    wait_time = between(0.005, 0.02)

    def on_start(self) -> None:
        self.new_session()

    def new_session(self) -> None:
        self.client.cookiejar.clear()
        self.session = TRACKER.new_session()
        self.left = SESSION_REQUESTS
        self.last: tuple[str, float] | None = None  # (version, send time) of the previous request

    @task
    def browse(self) -> None:
        if self.left <= 0:
            self.new_session()
        self.left -= 1
        path = random.choice(("/", "/products/1", "/cart"))
        result = fetch(self, "browser", path, sticky=bool(TRACKER.names.sticky_cookie))
        if result is None:
            return
        version, sent, received = result
        if self.last is not None and self.last[0] != version:
            TRACKER.flip(Flip(self.session, self.last[0], version, self.last[1], received))
        self.last = (version, sent)
        TRACKER.observe(session=self.session, version=version, sent=sent, received=received)


class ApiUser(FastHttpUser):
    """No cookies: every request is a new user to the proxy, with its own bucket draw."""

    weight = 2
    wait_time = between(0.005, 0.02)

    @task
    def call(self) -> None:
        self.client.cookiejar.clear()
        result = fetch(self, "api", f"/api/items?page={random.randint(1, 50)}")
        if result is not None:
            version, sent, received = result
            TRACKER.observe(session=None, version=version, sent=sent, received=received)


class QaUser(FastHttpUser):
    """Sends the canary header, which must beat the cookie and the weight every time."""

    weight = 1
    wait_time = between(0.005, 0.02)

    @task
    def check(self) -> None:
        names = TRACKER.names
        if not names.qa_header:
            self.wait()  # the proxy routes by no header: nothing for QA to check
            return
        result = fetch(self, "qa", "/", headers={names.qa_header: names.qa_value})
        if result is not None:
            TRACKER.qa_requests += 1
            TRACKER.qa_misroutes += result[0] != CANARY


# -- the verdict -----------------------------------------------------------------------------


def build_report(environment: Environment) -> dict[str, Any]:
    if TRACKER.poller is not None:
        TRACKER.poller.kill(block=True)
    if TRACKER.history is not None:
        poll_once()  # the users have stopped: this poll settles everything still pending
    TRACKER.commit(everything=True)
    total = environment.stats.total
    checks: list[dict[str, Any]] = []
    error_rate = total.num_failures / total.num_requests if total.num_requests else 1.0
    checks.append(
        {
            "name": "errors",
            "pass": total.num_requests > 0 and error_rate <= MAX_ERROR_RATE,
            "detail": f"{total.num_failures} of {total.num_requests} requests failed "
            f"({100 * error_rate:.3f}%, limit {100 * MAX_ERROR_RATE:.3f}%)",
        }
    )
    phases = [
        p.judge(delta=DELTA, min_users=MIN_SHARE_USERS)
        for p in sorted(TRACKER.phases.values(), key=lambda p: p.share)
    ]
    if TRACKER.history is None:
        checks.append({"name": "share", "pass": True, "detail": "skipped (no CANARY_PROXY_ADMIN_URL)"})
    else:
        for phase in phases:
            checks.append({"name": "share", "pass": phase["pass"], "detail": _describe_phase(phase)})
        if not any(p["judged"] for p in phases):
            checks.append(
                {
                    "name": "share",
                    "pass": False,
                    "detail": f"no weight was seen by {MIN_SHARE_USERS}+ users",
                }
            )
    flips = summarize_flips(TRACKER.flips, TRACKER.history)
    if not TRACKER.names.sticky_cookie:
        flips["pass"] = True
        detail = "skipped (sticky-cookie is off: browser users are not sticky)"
    else:
        detail = (
            f"{flips['violations']} violations in {flips['violating_sessions']} of "
            f"{TRACKER.next_session} browser sessions; allowed after a weight change: "
            f"{flips['allowed_stable_to_canary']} stable->canary, "
            f"{flips['allowed_canary_to_stable']} canary->stable"
        )
        if TRACKER.flips_dropped:
            flips["pass"] = False
            detail += f" (+{TRACKER.flips_dropped} flips not kept)"
    checks.append({"name": "flips", "pass": flips["pass"], "detail": detail})
    if TRACKER.names.qa_header:
        checks.append(
            {
                "name": "header misroutes",
                "pass": TRACKER.qa_misroutes == 0 and TRACKER.qa_requests > 0,
                "detail": f"{TRACKER.qa_misroutes} of {TRACKER.qa_requests} QA requests with "
                f"'{TRACKER.names.qa_header}: {TRACKER.names.qa_value}' not served by the canary",
            }
        )
    else:
        checks.append({"name": "header misroutes", "pass": True, "detail": "skipped (no canary-by-header)"})
    history = TRACKER.history
    return {
        "pass": all(c["pass"] for c in checks),
        "checks": checks,
        "requests": total.num_requests,
        "failures": total.num_failures,
        "error_rate": error_rate,
        "phases": phases,
        "in_transition": TRACKER.in_transition,
        "weights_seen": [[p.weight, p.total] for p in history.polls] if history else [],
        "poll_failures": TRACKER.poll_failures,
        "flips": flips,
        "qa": {"requests": TRACKER.qa_requests, "misroutes": TRACKER.qa_misroutes},
        "browser_sessions": TRACKER.next_session,
        "stopped_at_request_cap": TRACKER.capped,
        "delta": DELTA,
    }


def _describe_phase(phase: dict[str, Any]) -> str:
    text = (
        f"weight {phase['weight']:g}/{phase['total']} (expected {100 * phase['expected']:.2f}%): "
        f"observed {100 * phase['observed']:.2f}% of {phase['users']} users "
        f"({phase['api']} API requests + {phase['sessions']} browser sessions), "
        f"tolerance +/-{100 * phase['tolerance']:.2f}% (Bernstein, delta={DELTA:g}); "
        f"request share {100 * phase['request_share']:.2f}% of {phase['requests']}"
    )
    return text if phase["judged"] else text + " [too few users: not judged]"


@events.quitting.add_listener
def _quitting(environment: Environment, **_: Any) -> None:
    report = build_report(environment)
    lines = ["", "canary load test report"]
    for check in report["checks"]:
        lines.append(f"  {'PASS' if check['pass'] else 'FAIL'}  {check['name']}: {check['detail']}")
    if TRACKER.capped:
        lines.append(f"  (stopped at CANARY_MAX_REQUESTS={MAX_REQUESTS} before --run-time ran out)")
    if report["in_transition"]:
        lines.append(f"  (left out of the share: {report['in_transition']} requests during a weight change)")
    lines.append(f"RESULT: {'PASS' if report['pass'] else 'FAIL'}")
    print("\n".join(lines), flush=True)
    if path := os.environ.get("CANARY_REPORT_FILE"):
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    environment.process_exit_code = 0 if report["pass"] else 1
