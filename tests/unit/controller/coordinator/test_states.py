"""A coordinator's phases and the one table of moves between them."""

from __future__ import annotations

import typing

import pytest

from llamafleet.controller.coordinator.states import (
    TRANSITIONS,
    BackingOff,
    CoordinatorState,
    Failed,
    InvalidTransition,
    Phase,
    Placing,
    Stopped,
    check_transition,
)


def test_the_table_names_every_variant() -> None:
    assert set(TRANSITIONS) == set(typing.get_args(Phase))
    assert {t.kind for t in TRANSITIONS} == set(CoordinatorState)


def test_legal_moves_pass_and_a_skipped_step_is_caught() -> None:
    check_transition(Stopped(), Placing(512))
    check_transition(Placing(512), BackingOff(1, 0.5, "exited"))
    check_transition(BackingOff(1, 0.5, "exited"), Failed("gave up"))
    check_transition(Failed("gave up"), Placing(512))
    with pytest.raises(InvalidTransition, match="Stopped → BackingOff"):
        check_transition(Stopped(), BackingOff(1, 0.5, "exited"))
    with pytest.raises(InvalidTransition, match="BackingOff → BackingOff"):
        check_transition(BackingOff(1, 0.5, "a"), BackingOff(2, 1.0, "b"))


def test_each_variant_says_what_ps_shows() -> None:
    assert BackingOff(2, 1.0, "exited with code 3").detail == "retrying in 1.0s after: exited with code 3"
    assert Placing(512).kind is CoordinatorState.STARTING and Failed("x").kind is CoordinatorState.FAILED
