"""The step plan (pure): parsing, validation, canonical text and the weight at each step."""

from __future__ import annotations

import pytest

from canary_proxy.rollout.plan import (
    Mirror,
    Pause,
    PlanError,
    SetWeight,
    describe,
    format_plan,
    parse_plan,
    percent_at,
    previous_weight_index,
)


@pytest.mark.parametrize(
    ("text", "plan"),
    [
        ("100", (SetWeight(100),)),
        ("5,10,25,50,100", tuple(SetWeight(p) for p in (5, 10, 25, 50, 100))),
        ("0.5, 12.5%, 100", (SetWeight(0.5), SetWeight(12.5), SetWeight(100))),
        ("pause,10,pause:10m,100", (Pause(None), SetWeight(10), Pause(600), SetWeight(100))),
        ("10,pause:1.5m,pause,100", (SetWeight(10), Pause(90), Pause(None), SetWeight(100))),
        ("mirror:2m,5,25,100", (Mirror(120), SetWeight(5), SetWeight(25), SetWeight(100))),
        ("mirror:30s,pause,mirror:1m,100", (Mirror(30), Pause(None), Mirror(60), SetWeight(100))),
    ],
)
def test_valid_plans(text: str, plan: tuple[object, ...]) -> None:
    assert parse_plan(text) == plan
    assert parse_plan(format_plan(parse_plan(text))) == plan  # the canonical text round-trips


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "comma-separated"),
        ("5,,100", "comma-separated"),
        ("5,10", "last step must be 100"),
        ("5,mirror:1m,100", "mirror steps come before any weight"),
        ("mirror,100", "expected mirror:DURATION"),
        ("mirror:soon,100", "expected mirror:DURATION"),
        ("mirror:1m", "last step must be 100"),
        ("5,100,pause", "last step must be 100"),
        ("0,100", "greater than 0"),
        ("150", "at most 100"),
        ("ten,100", "expected a percentage"),
        ("10,5,100", "weights must rise"),
        ("10,10,100", "weights must rise"),
        ("10,pause:soon,100", "pause:DURATION"),
        ("10,pause:0s,100", "pause:DURATION"),
    ],
)
def test_invalid_plans_say_why(text: str, expected: str) -> None:
    with pytest.raises(PlanError, match=expected):
        parse_plan(text)


def test_canonical_text() -> None:
    assert format_plan(parse_plan("5%, 12.5, pause, pause:90s, pause:10m, 100")) == (
        "5,12.5,pause,pause:90s,pause:10m,100"
    )


def test_percent_and_previous_weight_at_each_step() -> None:
    plan = parse_plan("pause,10,pause,25,pause:1m,100")
    assert [percent_at(plan, i) for i in range(len(plan))] == [0, 10, 10, 25, 25, 100]
    assert [previous_weight_index(plan, i) for i in range(len(plan))] == [None, None, None, 1, 1, 3]
    assert describe(plan, 2) == "step 3/6 (pause, canary at 10%)"
    assert describe(plan, 3) == "step 4/6 (25%)"


def test_a_mirror_step_holds_the_canary_at_0() -> None:
    plan = parse_plan("mirror:2m,5,100")
    assert [percent_at(plan, i) for i in range(3)] == [0, 5, 100]
    assert describe(plan, 0) == "step 1/3 (mirror:2m, mirroring to the canary, no users on it)"
    assert previous_weight_index(plan, 1) is None  # a gradual abort from 5% goes to 0
