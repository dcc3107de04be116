"""The demo's two views, rendered from a model: the live ``rich`` screen and the plain lines."""

from __future__ import annotations

import io

from rich.console import Console

from canary_proxy.demo.model import CheckRow, DemoModel, DemoOptions, VersionNow, version_now
from canary_proxy.demo.view import LiveView, PlainView
from canary_proxy.rollout.plan import parse_plan


def model() -> DemoModel:
    m = DemoModel(DemoOptions(bad_canary="errors"), parse_plan("5,10,25,50,100"))
    m.urls = {"proxy": "http://127.0.0.1:8080", "dashboard": "http://127.0.0.1:9090/"}
    m.phase, m.step, m.weight, m.fault_active = "Progressing", "3/5 (25%)", 25.0, True
    m.versions["stable"] = VersionNow(rate=120.0, error_rate=0.0, p50=0.175, p99=0.2485)
    m.versions["canary"] = VersionNow(rate=40.0, error_rate=0.3, p50=0.175, p99=0.2485)
    m.users.update(stable=24, canary=8)
    stats = {"requests": 36, "errors": 11, "errorRate": 11 / 36, "p99": 0.2485}
    reasons = ["error rate 30.56% > max 1.00%"]
    m.checks.append(
        CheckRow(11.5, "3/5 (25%)", "fail", stats, {}, reasons, "check fail at step 3/5 (25%): ...")
    )
    m.events.append((10.3, "canary v2 starts failing now", True))
    return m


def test_the_live_view_shows_phase_weight_versions_and_verdicts() -> None:
    view = LiveView()
    buffer = io.StringIO()
    view.console = Console(file=buffer, width=160, color_system=None)
    view.console.print(view.render(model()))
    screen = buffer.getvalue()
    for text in (
        "Progressing",
        "3/5 (25%)",
        "25%",
        "failing now (errors)",
        "http://127.0.0.1:9090/",
        "│ canary v2 │  40.0 │ 30.00% │ 175.0ms │ 248.5ms │            8 │",
        "36 req, 30.56% 5xx, p99 248.5ms",
        "error rate 30.56% > max 1.00%",
        "canary v2 starts failing now",
    ):
        assert text in screen, (text, screen)


def test_the_plain_view_prints_events_summaries_and_the_result() -> None:
    out = io.StringIO()
    view, m = PlainView(out), model()
    view.start(m)
    view.event(m, "rollout started: steps 5,10,25,50,100; step 1/5 (5%)")
    view.next_summary = 0
    view.tick(m)
    view.close(m, 1)
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "canary-proxy demo: a rollout through 5,10,25,50,100 on loopback; "
        "bad canary: v2 starts failing (errors) once it serves 20% of traffic"
    )
    assert lines[1] == "  proxy      http://127.0.0.1:8080"
    assert lines[-3].endswith("] rollout started: steps 5,10,25,50,100; step 1/5 (5%)")
    assert lines[-2].endswith(
        "] traffic: weight 25% | stable v1 120.0 req/s, 0.00% 5xx, p99 248.5ms | "
        "canary v2 40.0 req/s, 30.00% 5xx, p99 248.5ms | sticky users: 24 on stable, 8 on canary"
    )
    assert lines[-1] == "result: rolled back (exit 1)"


def test_version_now_pools_the_last_points() -> None:
    series = {
        "canary": {"requestRate": [10.0, 30.0, 10.0], "errorRate": [0.0, 0.5, None], "p99": [0.2, None, None]}
    }
    now = version_now(series, "canary")
    assert now.rate == 50 / 3 and now.error_rate == 15 / 50 and now.p99 == 0.2 and now.p50 is None
