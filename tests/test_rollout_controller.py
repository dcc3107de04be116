"""The controller's decisions (pure): one tick at a time, from a recorded state and a check."""

from __future__ import annotations

import pytest

from canary_proxy.rollout.analysis import Verdict
from canary_proxy.rollout.decide import Decision, Settings, decide, mirror_percent, start
from canary_proxy.rollout.plan import parse_plan
from canary_proxy.rollout.state import RolloutState, StateError, decode, encode

PASS, FAIL, NODATA = (
    Verdict("pass", ()),
    Verdict("fail", ("error rate 5% > max 1%",)),
    Verdict("inconclusive", ()),
)
T0 = 1_700_000_000.0


def settings(steps: str = "10,pause,50,100", **kwargs: object) -> Settings:
    options: dict[str, object] = {"step_duration": 60, "interval": 15, "progress_deadline": 600}
    options.update(kwargs)
    return Settings(plan=parse_plan(steps), **options)  # type: ignore[arg-type]


def begin(s: Settings) -> RolloutState:
    return start(RolloutState(), s, now=T0, restart=False).state


def run(s: Settings, state: RolloutState, ticks: list[tuple[float, Verdict | None]]) -> list[Decision]:
    """Apply ticks (seconds since T0, check) in order; each re-reads what the last one wrote."""
    decisions = []
    for at, check in ticks:
        decision = decide(state, s, now=T0 + at, check=check)
        decisions.append(decision)
        state = decode(_as_stored(encode(decision.state), state.command, decision.consumed))
        if decision.outcome is not None:
            break
    return decisions


def _as_stored(notes: dict[str, str | None], command: str | None, consumed: str | None) -> dict[str, str]:
    stored = {k: v for k, v in notes.items() if v is not None}
    if command is not None and command != consumed:
        stored["canary-proxy.io/command"] = command
    return stored


def last(decisions: list[Decision]) -> Decision:
    return decisions[-1]


def test_start_enters_the_first_step() -> None:
    d = start(RolloutState(), settings(), now=T0, restart=False)
    assert (d.state.phase, d.state.step, d.percent, d.outcome, d.write) == ("Progressing", 0, 10, None, True)
    assert d.state.steps == "10,pause,50,100"


@pytest.mark.parametrize(("phase", "code"), [("Promoted", 0), ("RolledBack", 1), ("Aborted", 1)])
def test_a_finished_rollout_reports_its_outcome_unless_restarted(phase: str, code: int) -> None:
    done = RolloutState(phase=phase, steps="10,pause,50,100", step=3)  # type: ignore[arg-type]
    d = start(done, settings(), now=T0, restart=False)
    assert (d.outcome, d.write) == (code, False)
    d = start(done, settings(), now=T0, restart=True)
    assert (d.state.phase, d.state.step, d.outcome, d.write) == ("Progressing", 0, None, True)


def test_a_different_plan_is_refused_unless_restarted() -> None:
    running = begin(settings("10,50,100"))
    d = start(running, settings("10,25,100"), now=T0, restart=False)
    assert (d.outcome, d.write) == (2, False)
    assert "--steps 10,25,100 differs" in d.message
    assert start(running, settings("10,25,100"), now=T0, restart=True).state.steps == "10,25,100"


def test_resume_keeps_the_step_and_its_counters() -> None:
    recorded = begin(settings()).with_(
        step=2, phase="Progressing", passes=1, failures=1, step_started=T0 - 30
    )
    d = start(recorded, settings(), now=T0 + 1000, restart=False)
    assert (d.state.step, d.state.passes, d.state.failures, d.state.step_started) == (2, 1, 1, T0 - 30)
    assert d.state.progress_since == T0 + 1000  # the deadline restarts: no checks ran meanwhile
    assert d.percent == 50 and "resumed" in d.message


def test_a_weight_step_needs_its_duration_and_a_passing_check() -> None:
    ds = run(settings(), begin(settings()), [(15, NODATA), (30, PASS), (45, NODATA), (60, NODATA)])
    assert [d.state.phase for d in ds] == ["Progressing", "Progressing", "Progressing", "Paused"]
    assert [d.percent for d in ds] == [10, 10, 10, 10]  # a pause keeps the weight


def test_time_alone_never_advances() -> None:
    ds = run(settings(), begin(settings()), [(60, NODATA), (120, NODATA), (180, NODATA)])
    assert {d.state.step for d in ds} == {0}


def test_a_failure_after_the_pass_holds_the_step() -> None:
    ds = run(settings(failure_threshold=3), begin(settings()), [(15, PASS), (60, FAIL), (75, PASS)])
    assert [d.state.step for d in ds] == [0, 0, 1]


@pytest.mark.parametrize(
    ("checks", "rolled_back_at"),
    [
        ([FAIL, FAIL], 1),
        ([FAIL, NODATA, FAIL], 2),  # inconclusive neither counts nor resets
        ([FAIL, PASS, FAIL, PASS], None),  # a pass resets the count
        ([NODATA, FAIL, FAIL], 2),
    ],
)
def test_consecutive_failures_roll_back(checks: list[Verdict], rolled_back_at: int | None) -> None:
    s = settings(step_duration=3600)
    ds = run(s, begin(s), [(15 * (i + 1), c) for i, c in enumerate(checks)])
    if rolled_back_at is None:
        assert ds[-1].outcome is None
        return
    assert len(ds) == rolled_back_at + 1
    d = last(ds)
    assert (d.state.phase, d.percent, d.outcome) == ("RolledBack", 0, 1)
    assert "2 consecutive failed checks" in d.message


def test_no_conclusive_check_until_the_deadline_rolls_back() -> None:
    s = settings(progress_deadline=120)
    ds = run(s, begin(s), [(60, NODATA), (119, NODATA), (121, NODATA)])
    assert (last(ds).state.phase, last(ds).outcome) == ("RolledBack", 1)
    assert "no conclusive check for 2m (--progress-deadline)" in last(ds).message


def test_an_endless_pause_waits_for_promote_but_still_rolls_back_on_failures() -> None:
    s = settings(progress_deadline=120)
    paused = begin(s).with_(phase="Paused", step=1)
    ds = run(s, paused, [(1000, NODATA), (5000, PASS), (9000, NODATA)])
    assert {d.state.phase for d in ds} == {"Paused"} and ds[-1].outcome is None
    promoted = decide(paused.with_(command="promote 1a2b"), s, now=T0 + 9001, check=None)
    assert (promoted.state.phase, promoted.state.step, promoted.percent) == ("Progressing", 2, 50)
    assert promoted.consumed == "promote 1a2b"
    failing = run(s, paused, [(15, FAIL), (30, FAIL)])
    assert (last(failing).state.phase, last(failing).percent) == ("RolledBack", 0)


def test_a_timed_pause_ends_by_itself() -> None:
    s = settings("10,pause:2m,100")
    ds = run(s, begin(s), [(15, PASS), (60, None), (120, None), (180, None)])
    assert [(d.state.phase, d.state.step) for d in ds] == [
        ("Progressing", 0),
        ("Paused", 1),
        ("Paused", 1),
        ("Progressing", 2),
    ]
    assert ds[-1].percent == 100


def test_the_last_step_needs_a_pass_then_promotes() -> None:
    s = settings("100")
    ds = run(s, begin(s), [(15, NODATA), (30, PASS), (60, NODATA)])
    assert [d.outcome for d in ds] == [None, None, 0]
    assert (last(ds).state.phase, last(ds).percent) == ("Promoted", 100)


@pytest.mark.parametrize(
    ("command", "phase", "percent", "outcome"),
    [
        ("abort", "Aborted", 0, 1),
        ("abort 9f9f", "Aborted", 0, 1),
        ("promote-full 9f9f", "Promoted", 100, 0),
        ("promote 9f9f", "Paused", 10, None),  # ends step 1 now: on to the pause
    ],
)
def test_commands(command: str, phase: str, percent: float, outcome: int | None) -> None:
    d = decide(begin(settings()).with_(command=command), settings(), now=T0 + 1, check=FAIL)
    assert (d.state.phase, d.percent, d.outcome, d.consumed) == (phase, percent, outcome, command)


def test_an_unknown_command_is_dropped_with_a_warning() -> None:
    d = decide(begin(settings()).with_(command="yolo"), settings(), now=T0 + 1, check=None)
    assert (d.state.phase, d.consumed, d.warning) == ("Progressing", "yolo", True)


def test_gradual_abort_steps_back_down_one_tick_at_a_time() -> None:
    s = settings("10,25,50,100", gradual_abort=True, step_duration=15)
    state = begin(s).with_(step=2)
    ds = run(s, state, [(15, FAIL), (30, FAIL), (45, PASS), (60, PASS), (75, PASS)])
    assert [(d.state.phase, d.percent) for d in ds] == [
        ("Progressing", 50),
        ("RollingBack", 25),
        ("RollingBack", 10),
        ("RolledBack", 0),
    ]
    assert ds[-1].outcome == 1


def test_the_state_round_trips_through_annotations() -> None:
    state = begin(settings()).with_(passes=2, failures=1, last_analysis='{"result":"pass"}', message="m")
    assert decode({k: v for k, v in encode(state).items() if v is not None}) == state


@pytest.mark.parametrize(
    "notes",
    [
        {"canary-proxy.io/phase": "Dancing"},
        {"canary-proxy.io/phase": "Progressing", "canary-proxy.io/step": "x"},
        {"canary-proxy.io/phase": "Progressing", "canary-proxy.io/progress": "{"},
    ],
)
def test_unreadable_state_is_an_error(notes: dict[str, str]) -> None:
    with pytest.raises(StateError):
        decode(notes)


def test_the_check_line_has_the_numbers_and_the_count() -> None:
    from canary_proxy.rollout.analysis import Thresholds, VersionStats, Window, verdict

    s = settings(thresholds=Thresholds(min_requests=10))
    window = Window(stable=VersionStats(400, 0, 0.04), canary=VersionStats(100, 30, 0.05))
    d = decide(begin(s), s, now=T0 + 15, check=verdict(window, s.thresholds, relative=True))
    assert d.check is not None
    assert d.check.startswith("check fail at step 1/4 (10%): canary 100 req, 30 5xx (30.00%)")
    assert d.check.endswith("consecutive failures 1/2")


@pytest.mark.parametrize(
    ("before_step", "after_step", "after_phase", "percent", "consumed", "expected"),
    [
        (0, 1, "Progressing", 50.0, None, ["pre-step"]),
        (2, 3, "Progressing", 100.0, None, ["confirm-promotion", "pre-step"]),
        (2, 3, "Progressing", 100.0, "promote:1", []),  # a human's promote is not gated
        (1, 1, "Progressing", 50.0, None, []),  # no move
        (3, 3, "Promoted", 100.0, None, []),  # finishing the last step
        (2, 1, "RollingBack", 10.0, None, []),  # stepping down
    ],
)
def test_which_gates_a_decision_must_pass(
    before_step: int, after_step: int, after_phase: str, percent: float, consumed: str | None,
    expected: list[str],
) -> None:  # fmt: skip
    from canary_proxy.rollout.decide import gates

    s = settings("10,50,75,100")
    before = RolloutState(phase="Progressing", steps="10,50,75,100", step=before_step)
    after = before.with_(phase=after_phase, step=after_step)  # type: ignore[arg-type]
    assert gates(before, Decision(after, percent, "m", consumed=consumed), s) == expected


def test_a_mirror_step_runs_at_weight_0_for_its_duration_with_a_pass() -> None:
    s = settings("mirror:2m,50,100")
    state = begin(s)
    assert (state.phase, state.step) == ("Progressing", 0)
    assert mirror_percent(start(RolloutState(), s, now=T0, restart=False), s) == 100
    ds = run(s, state, [(60, PASS), (100, PASS), (120, PASS)])
    assert [(d.state.step, d.percent) for d in ds] == [(0, 0), (0, 0), (1, 50)]
    assert [mirror_percent(d, s) for d in ds] == [100, 100, 0]  # off once users reach the canary


def test_a_failing_mirror_step_rolls_back_before_any_user_saw_the_canary() -> None:
    s = settings("mirror:2m,50,100", mirror_percent=25)
    ds = run(s, begin(s), [(15, FAIL), (30, FAIL)])
    assert (last(ds).state.phase, last(ds).percent, last(ds).outcome) == ("RolledBack", 0, 1)
    assert mirror_percent(ds[0], s) == 25 and mirror_percent(last(ds), s) == 0


def test_a_plan_without_mirror_steps_leaves_the_mirror_key_alone() -> None:
    s = settings("10,100")
    assert mirror_percent(run(s, begin(s), [(60, PASS)])[0], s) is None
