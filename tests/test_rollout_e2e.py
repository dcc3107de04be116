"""Rollouts end to end in file mode: the real proxy process, the real ``rollout`` process
scraping the proxy's /metrics, backends whose errors and latency the test controls."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from .conftest import Backend, ProxyFactory, ProxyProcess, base_config
from .rollouts import (
    LATENCY,
    Stopwatch,
    cli,
    file_state,
    rollout,
    rollout_args,
    rollout_proxy,
    traffic,
    weights_loaded,
)

INTERVAL = 0.5


@pytest.fixture
async def proxy(backends: tuple[Backend, Backend], proxy_factory: ProxyFactory) -> ProxyProcess:
    return await rollout_proxy(backends, proxy_factory)


args = rollout_args


def at(step: str) -> object:
    return lambda msg: f"now at {step}" in msg


async def test_a_healthy_canary_is_promoted_step_by_step(proxy: ProxyProcess) -> None:
    async with traffic(proxy.url) as load, rollout(*args(proxy, "20,50,100")) as run:
        assert await run.exit_code() == 0
    weight, state = file_state(proxy.config_path)
    assert weight == 100 and state["canary-proxy.io/phase"] == "Promoted"
    assert [m for m in run.messages if m.startswith(("rollout started", "step done", "promoted"))] == [
        "rollout started: steps 20,50,100; step 1/3 (20%)",
        "step done; now at step 2/3 (50%)",
        "step done; now at step 3/3 (100%)",
        "promoted: step done at step 3/3 (100%); the canary serves 100%",
    ]
    checks = [m for m in run.messages if m.startswith("check ")]
    assert all(m.startswith("check pass") or m.startswith("check inconclusive") for m in checks), checks
    await proxy.wait_log(lambda e: e.get("effective", {}).get("canary-weight") == 100)
    assert weights_loaded(proxy.logs) == [0, 20, 50, 100]  # the proxy took every step
    assert load.statuses.keys() == {200} and load.versions["canary"] > 0


async def test_a_canary_failing_at_20_percent_is_rolled_back(
    proxy: ProxyProcess, backends: tuple[Backend, Backend]
) -> None:
    _, canary = backends
    async with traffic(proxy.url), rollout(*args(proxy, "10,20,100", "--step-duration", "30s")) as run:
        await run.wait_log(lambda m: m == "rollout started: steps 10,20,100; step 1/3 (10%)")
        await run.wait_log(lambda m: m.startswith("check pass"))
        # promote ends step 1 now; the canary breaks as soon as it serves 20%
        assert (await cli("promote", "--config", str(proxy.config_path)))[0] == 0
        await run.wait_log(at("step 2/3 (20%)"))
        canary.fail_status = 500
        clock = Stopwatch()
        assert await run.exit_code() == 1
        took = clock.elapsed
    weight, state = file_state(proxy.config_path)
    assert weight == 0 and state["canary-proxy.io/phase"] == "RolledBack"
    assert "2 consecutive failed checks; last: error rate" in state["canary-proxy.io/message"]
    # failure-threshold x interval, plus one scrape and write of slack
    assert took < 2 * INTERVAL + 1.0, took
    failed = [m for m in run.messages if m.startswith("check fail")]
    assert len(failed) == 2 and "error rate" in failed[-1] and "> max 1.00% FAIL" in failed[-1]
    analysis = json.loads(state["canary-proxy.io/last-analysis"])
    assert analysis["result"] == "fail" and analysis["canary"]["errorRate"] > 0.01
    assert analysis["limits"]["maxErrorRate"] == 0.01
    await proxy.wait_log(
        lambda e: e.get("effective", {}).get("canary-weight") == 0 and e.get("msg", "") != ""
    )


async def test_no_traffic_never_promotes(proxy: ProxyProcess) -> None:
    async with rollout(*args(proxy, "20,100", "--progress-deadline", "2s")) as run:
        assert await run.exit_code() == 1
    weight, state = file_state(proxy.config_path)
    assert weight == 0 and state["canary-proxy.io/phase"] == "RolledBack"
    assert "no conclusive check for 2s (--progress-deadline)" in state["canary-proxy.io/message"]
    checks = [m for m in run.messages if m.startswith("check ")]
    assert checks and all(m.startswith("check inconclusive") for m in checks)
    assert "fewer than --min-requests 10" in checks[-1]
    assert not any("now at step 2" in m for m in run.messages)


async def test_header_routed_traffic_counts_for_the_canary(
    backends: tuple[Backend, Backend], proxy_factory: ProxyFactory
) -> None:
    stable, canary = backends
    stable.delay = canary.delay = LATENCY
    config = base_config(stable, canary, canary_weight=0, canary_by_header="X-Canary")
    proxy = await proxy_factory(config, "--access-log", "off")
    # Paused at weight 0: only QA traffic with the header reaches the canary, and is judged.
    async with traffic(proxy.url, headers={"X-Canary": "always"}), rollout(*args(proxy, "pause,100")) as run:
        entry = await run.wait_log(lambda m: m.startswith("check pass at step 1/2 (pause, canary at 0%)"))
        assert entry["check"]["canary"]["requests"] >= 10 and entry["check"]["stable"]["requests"] == 0


async def test_pause_waits_for_promote(proxy: ProxyProcess) -> None:
    async with traffic(proxy.url), rollout(*args(proxy, "20,pause,100")) as run:
        await run.wait_log(at("step 2/3 (pause, canary at 20%)"))
        mark = len(run.logs)  # hold through a few checks: it waits for promote, not for time
        await run.wait_log(lambda m: m.startswith("check pass") and len(run.logs) > mark + 3)
        assert file_state(proxy.config_path)[1]["canary-proxy.io/phase"] == "Paused"
        code, out, _ = await cli("promote", "--config", str(proxy.config_path))
        assert code == 0 and "promote requested (Paused, step 2)" in out
        clock = Stopwatch()
        await run.wait_log(lambda m: m.startswith("promoted by request; now at step 3/3 (100%)"))
        assert clock.elapsed < INTERVAL + 1.0
        assert await run.exit_code() == 0
    assert file_state(proxy.config_path)[0] == 100
    assert "canary-proxy.io/command" not in file_state(proxy.config_path)[1]  # handled, removed


async def test_abort_during_a_step(proxy: ProxyProcess) -> None:
    async with traffic(proxy.url), rollout(*args(proxy, "20,100", "--step-duration", "1m")) as run:
        await run.wait_log(lambda m: m.startswith("check pass"))
        code, out, _ = await cli("abort", "--config", str(proxy.config_path))
        assert code == 0, out
        clock = Stopwatch()
        assert await run.exit_code() == 1
        assert clock.elapsed < INTERVAL + 1.5
    weight, state = file_state(proxy.config_path)
    assert weight == 0 and state["canary-proxy.io/phase"] == "Aborted"
    assert state["canary-proxy.io/message"] == "aborted at step 1/2 (20%) by request; canary weight 0"
    # an aborted rollout is final: running it again reports the outcome at once
    async with rollout(*args(proxy, "20,100")) as again:
        assert await again.exit_code() == 1
    assert any(m.startswith("rollout already Aborted") for m in again.messages)


async def test_promote_full_finishes_at_once(proxy: ProxyProcess) -> None:
    async with traffic(proxy.url), rollout(*args(proxy, "20,50,100", "--step-duration", "1m")) as run:
        await run.wait_log(lambda m: m.startswith("rollout started"))
        assert (await cli("promote", "--full", "--config", str(proxy.config_path)))[0] == 0
        assert await run.exit_code() == 0
    weight, state = file_state(proxy.config_path)
    assert weight == 100 and state["canary-proxy.io/phase"] == "Promoted"


async def test_a_restarted_controller_resumes_at_the_recorded_step(proxy: ProxyProcess) -> None:
    async with traffic(proxy.url):
        async with rollout(*args(proxy, "20,50,100")) as first:
            await first.wait_log(at("step 2/3 (50%)"))
            first.process.send_signal(signal.SIGKILL)  # a pod killed mid-rollout
            assert await first.exit_code() == -signal.SIGKILL
        weight, state = file_state(proxy.config_path)
        assert (weight, state["canary-proxy.io/step"]) == (50, "1")
        code, _, err = await cli("rollout", *args(proxy, "10,50,100"))
        assert code == 2 and "--steps 10,50,100 differs" in err
        async with rollout(*args(proxy, "20,50,100")) as second:
            assert await second.exit_code() == 0
    assert second.messages[:2] == [
        "analysing route default",
        "rollout resumed (Progressing) at step 2/3 (50%)",
    ]
    assert not any("(20%)" in m for m in second.messages)  # never back to the first step
    assert file_state(proxy.config_path)[0] == 100


async def test_sigterm_keeps_the_state_to_resume(proxy: ProxyProcess) -> None:
    async with rollout(*args(proxy, "20,100")) as run:
        await run.wait_log(lambda m: m.startswith("rollout started"))
        run.process.send_signal(signal.SIGTERM)
        assert await run.exit_code() == 128 + signal.SIGTERM
    assert file_state(proxy.config_path)[1]["canary-proxy.io/phase"] == "Progressing"


# -- the CLI contract, without traffic --------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "canary.yaml"
    path.write_text("# comment\nstable-url: http://127.0.0.1:1\ncanary-url: http://127.0.0.1:2\n")
    return path


SCRAPE = ("--metrics-url", "http://127.0.0.1:9/metrics")


def write(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--steps", "10,100"], "exactly one of [NS/]NAME"),
        (["--config", "{cfg}", *SCRAPE], "--steps: required"),
        (["--config", "{cfg}", "--steps", "10,100"], "exactly one metric source"),
        (
            ["--config", "{cfg}", "--steps", "10,100", *SCRAPE, "--prometheus", "http://p"],
            "exactly one metric",
        ),
        (["--config", "{cfg}", "--steps", "10,5,100", *SCRAPE], "weights must rise"),
        (["--config", "{cfg}", "--steps", "10,100", *SCRAPE, "--max-error-rate", "x"], "--max-error-rate"),
        (["--config", "{cfg}", "--steps", "10,100", *SCRAPE, "--max-p99-increase", "0.5"], "at least 1"),
        (["--config", "{cfg}", "--steps", "10,100", *SCRAPE, "--interval", "soon"], "--interval"),
        (
            ["--config", "{cfg}", "--steps", "10,mirror:1m,100", *SCRAPE],
            "mirror steps come before any weight",
        ),
        (
            ["--config", "{cfg}", "--steps", "mirror:1m,100", *SCRAPE, "--mirror-percent", "0"],
            "--mirror-percent",
        ),
    ],
)
async def test_bad_arguments_exit_2(config_file: Path, argv: list[str], expected: str) -> None:
    code, _, err = await cli("rollout", *(a.replace("{cfg}", str(config_file)) for a in argv))
    assert code == 2 and expected in err, err


async def test_a_missing_config_exits_3_and_an_invalid_one_2(config_file: Path, tmp_path: Path) -> None:
    code, _, err = await cli("rollout", "--config", str(tmp_path / "nope.yaml"), "--steps", "100", *SCRAPE)
    assert code == 3 and "no such file" in err
    write(config_file, "stable-url: http://127.0.0.1:1\n")
    code, _, err = await cli("rollout", "--config", str(config_file), "--steps", "100", *SCRAPE)
    assert code == 2 and "canary-url: required" in err


async def test_promote_abort_status_without_a_rollout(config_file: Path) -> None:
    for command in (["promote"], ["promote", "--full"], ["abort"]):
        code, _, err = await cli(*command, "--config", str(config_file))
        assert code == 1 and "no rollout to" in err
    code, out, _ = await cli("status", "--config", str(config_file))
    assert code == 0 and "no rollout recorded" in out and "weight:    0 of 100 (0%)" in out


async def test_status_shows_the_last_analysis(config_file: Path) -> None:
    analysis = {
        "time": "2025-01-01T00:00:00.000Z",
        "result": "fail",
        "reasons": ["error rate 25.00% > max 1.00%"],
        "canary": {"requests": 200, "errors": 50, "errorRate": 0.25, "p99": 0.049},
        "stable": {"requests": 800, "errors": 0, "errorRate": 0.0, "p99": 0.048},
        "checks": [{"name": "error-rate", "value": 0.25, "limit": 0.01, "ok": False}],
    }
    notes = {
        "canary-proxy.io/phase": "RolledBack",
        "canary-proxy.io/steps": "10,20,100",
        "canary-proxy.io/step": "1",
        "canary-proxy.io/message": "rolled back (2 consecutive failed checks)",
        "canary-proxy.io/last-analysis": json.dumps(analysis),
        "canary-proxy.io/progress": json.dumps(
            {"stepStarted": analysis["time"], "progressSince": analysis["time"], "passes": 0, "failures": 2}
        ),
    }
    write(config_file.with_name("canary.yaml.rollout.json"), json.dumps(notes))
    code, out, _ = await cli("status", "--config", str(config_file))
    assert code == 0
    assert out.splitlines()[:2] == [
        f"file {config_file}: RolledBack",
        "  step:      2/3 (20%)  (steps 10,20,100)",
    ]
    assert "canary: 200 req, 50 5xx (25.00%), p99 49.0ms" in out
    assert "error-rate: 25.00% (limit 1.00%) FAIL" in out
    code, out, _ = await cli("status", "-o", "json", "--config", str(config_file))
    assert json.loads(out)["lastAnalysis"]["canary"]["errors"] == 50
    code, _, err = await cli("rollout", "--config", str(config_file), "--steps", "10,20,100", *SCRAPE)
    assert code == 1 and "already RolledBack" in err  # final: the outcome's code at once
