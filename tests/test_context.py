"""ContextBudget: priority (own profile, recent lines, other profiles), reasons, the window bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csm_multi.context import ContextBudget, ContextItem, ContextPlan, Dropped
from csm_multi.errors import ContextTooLongError


def profile(speaker: str, positions: int) -> ContextItem:
    return ContextItem("profile", f"profile:{speaker}", speaker, positions, -1, payload=object())


def line(order: int, speaker: str, positions: int) -> ContextItem:
    return ContextItem("line", f"line {order}", speaker, positions, order, payload=object())


def labels(items) -> list[str]:
    return [i.label for i in items]


def test_everything_fits_in_prompt_order():
    own, other = profile("alice", 100), profile("bob", 100)
    history = [line(2, "bob", 50), line(0, "alice", 50), line(1, "bob", 50)]  # any input order
    plan = ContextBudget(2048).plan("alice", [own, other], history, reserved=500)
    assert labels(plan.kept) == ["profile:alice", "profile:bob", "line 0", "line 1", "line 2"]
    assert plan.dropped == []
    assert plan.used == 350 and plan.reserved == 500 and plan.window == 2048
    assert plan.free == 2048 - 850
    assert plan.kept[1] is other  # payload travels untouched
    # the order stays put when the other speaker talks next (so a prompt starts like the last one)
    assert labels(ContextBudget(2048).plan("bob", [own, other], history, reserved=500).kept) == labels(plan.kept)


def test_empty_context():
    plan = ContextBudget(100).plan("alice", [], [], reserved=100)
    assert plan == ContextPlan([], [], 0, 100, 100) and plan.free == 0


def test_current_speakers_profile_comes_first():
    # Room for one item: the current speaker's prompt wins over a newer line and the other prompt.
    plan = ContextBudget(1000).plan("Alice", [profile("bob", 300), profile("alice", 300)],
                                    [line(5, "bob", 300)], reserved=600)
    assert labels(plan.kept) == ["profile:alice"]
    assert {d.label for d in plan.dropped} == {"line 5", "profile:bob"}


def test_speaker_match_is_case_insensitive():
    plan = ContextBudget(1000).plan("ALICE", [profile("bob", 100), profile("alice", 100)], [], reserved=850)
    assert labels(plan.kept) == ["profile:alice"]


def test_recent_lines_beat_older_lines_and_other_prompts():
    history = [line(i, "bob" if i % 2 else "alice", 100) for i in range(10)]
    plan = ContextBudget(1000).plan("alice", [profile("alice", 200), profile("bob", 100)], history, reserved=400)
    # 600 free: own profile (200), then the four newest lines; bob's prompt comes after lines, no room
    assert labels(plan.kept) == ["profile:alice", "line 6", "line 7", "line 8", "line 9"]
    assert labels(d.item for d in plan.dropped) == ["line 5", "line 4", "line 3", "line 2", "line 1", "line 0",
                                                    "profile:bob"]


def test_other_prompts_fill_what_lines_leave():
    plan = ContextBudget(1000).plan("alice", [profile("bob", 150), profile("carol", 400), profile("dan", 50)],
                                    [line(0, "bob", 100), line(1, "carol", 100)], reserved=600)
    # 400 free: lines take 200; bob 150 fits, carol 400 is skipped, dan 50 still fits
    assert labels(plan.kept) == ["profile:bob", "profile:dan", "line 0", "line 1"]
    assert labels(d.item for d in plan.dropped) == ["profile:carol"]
    assert plan.used == 400 and plan.free == 0


def test_history_is_an_unbroken_recent_run():
    # A large line in the middle ends the run: older lines are not used to fill gaps.
    history = [line(0, "bob", 10), line(1, "bob", 500), line(2, "alice", 10)]
    plan = ContextBudget(1000).plan("alice", [], history, reserved=900)
    assert labels(plan.kept) == ["line 2"]
    reasons = {d.label: d.reason for d in plan.dropped}
    assert "needs 500 positions, 90 free" in reasons["line 1"]
    assert "older than line 1" in reasons["line 0"]


def test_current_profile_that_does_not_fit_is_reported_and_lines_still_used():
    plan = ContextBudget(1000).plan("alice", [profile("alice", 700)], [line(0, "bob", 100)], reserved=400)
    assert labels(plan.kept) == ["line 0"]
    [dropped] = plan.dropped
    assert isinstance(dropped, Dropped) and dropped.label == "profile:alice"
    assert "current speaker's profile needs 700 positions, 600 free" in dropped.reason
    assert str(dropped).startswith("profile:alice (")


def test_reserved_larger_than_window_raises():
    with pytest.raises(ContextTooLongError, match="2049 positions.*2048.*shorten"):
        ContextBudget().plan("alice", [profile("alice", 1)], [], reserved=2049)
    ContextBudget().plan("alice", [], [], reserved=2048)  # exactly full is fine


def test_bad_arguments():
    with pytest.raises(ValueError):
        ContextBudget(0)
    with pytest.raises(ValueError):
        ContextBudget().plan("a", [], [], reserved=-1)
    with pytest.raises(ValueError):
        ContextItem("clip", "x", "a", 1)
    with pytest.raises(ValueError):
        ContextItem("line", "x", "a", -1)


def test_payload_is_not_compared():
    assert ContextItem("line", "l", "a", 3, 1, payload=1) == ContextItem("line", "l", "a", 3, 1, payload=2)


# ---- property -----------------------------------------------------------------------------------
SPEAKERS = ["alice", "Bob", "carol"]


@st.composite
def scenarios(draw):
    window = draw(st.integers(1, 3000))
    reserved = draw(st.integers(0, window))
    sizes = st.integers(0, 1500)
    profiles = [ContextItem("profile", f"profile:{s}", s, draw(sizes), -1)
                for s in draw(st.lists(st.sampled_from(SPEAKERS), unique=True))]
    orders = draw(st.lists(st.integers(0, 40), max_size=15))  # ties allowed
    history = [ContextItem("line", f"line {i}", draw(st.sampled_from(SPEAKERS)), draw(sizes), o)
               for i, o in enumerate(orders)]
    current = draw(st.sampled_from(SPEAKERS)).upper()
    return window, reserved, current, profiles, history


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_plan_properties(scenario):
    window, reserved, current, profiles, history = scenario
    plan = ContextBudget(window).plan(current, profiles, history, reserved)

    # never over the window; used is exactly the kept sizes
    assert plan.used == sum(i.positions for i in plan.kept)
    assert plan.used + plan.reserved <= window and plan.free >= 0

    # kept and dropped partition the input (by identity)
    everything = [*profiles, *history]
    kept_ids, dropped_ids = [id(i) for i in plan.kept], [id(d.item) for d in plan.dropped]
    assert sorted(kept_ids + dropped_ids) == sorted(id(i) for i in everything)
    assert len(set(kept_ids + dropped_ids)) == len(everything)
    assert all(d.reason for d in plan.dropped)

    # the current speaker's prompt is kept whenever it alone fits with the reservation
    own = [p for p in profiles if p.speaker.casefold() == current.casefold()]
    for p in own:
        assert (p in plan.kept) == (p.positions + reserved <= window)

    # prompt order: profiles in the order given, then lines oldest -> newest
    kept_profiles = [i for i in plan.kept if i.kind == "profile"]
    assert [id(i) for i in kept_profiles] == [id(p) for p in profiles if p in kept_profiles]
    assert [i.kind for i in plan.kept] == sorted((i.kind for i in plan.kept), key=lambda k: k != "profile")
    kept_lines = [i for i in plan.kept if i.kind == "line"]
    assert [i.order for i in kept_lines] == sorted(i.order for i in kept_lines)

    # kept lines are the newest ones: every dropped line is no newer than every kept line
    dropped_lines = [d.item for d in plan.dropped if d.item.kind == "line"]
    if kept_lines and dropped_lines:
        assert max(i.order for i in dropped_lines) <= min(i.order for i in kept_lines)
