"""A coordinator's lifecycle as a tagged union, and the one table of the moves between its variants.

Each variant carries only what is true in it: a `Ready` one has its process and incarnation, a
`BackingOff` one its delay and cause, a `Failed` one its cause; nothing is left over from an
earlier state. `CoordinatorState` is the coarse kind that `ps`, metrics and events name
(placing, loading and backing off are all `starting` there).

`check_transition` is the only gate: a move the table does not hold is a bug in the owner
(`InvalidTransition`), caught by the tests rather than shown to users as a strange state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from llamafleet.controller.coordinator.command import CoordinatorSpec
from llamafleet.controller.coordinator.process import Coordinator


class CoordinatorState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True)
class Stopped:
    kind: ClassVar[CoordinatorState] = CoordinatorState.STOPPED
    detail: str = ""  # why it stopped (keep-alive expired, unloaded, does not fit…); "" when it never ran


@dataclass(frozen=True)
class Placing:
    kind: ClassVar[CoordinatorState] = CoordinatorState.STARTING
    ctx: int

    @property
    def detail(self) -> str:
        return "placing"


@dataclass(frozen=True)
class Loading:
    kind: ClassVar[CoordinatorState] = CoordinatorState.STARTING
    spec: CoordinatorSpec
    process: Coordinator

    @property
    def detail(self) -> str:
        return f"loading over {len(self.spec.backends)} backend(s)"


@dataclass(frozen=True)
class Ready:
    kind: ClassVar[CoordinatorState] = CoordinatorState.READY
    spec: CoordinatorSpec
    process: Coordinator
    incarnation: int

    @property
    def detail(self) -> str:
        return ""


@dataclass(frozen=True)
class Stopping:
    kind: ClassVar[CoordinatorState] = CoordinatorState.STOPPING
    spec: CoordinatorSpec
    process: Coordinator
    reason: str

    @property
    def detail(self) -> str:
        return self.reason


@dataclass(frozen=True)
class BackingOff:
    kind: ClassVar[CoordinatorState] = CoordinatorState.STARTING
    failures: int
    delay_s: float
    cause: str

    @property
    def detail(self) -> str:
        return f"retrying in {self.delay_s:.1f}s after: {self.cause}"


@dataclass(frozen=True)
class Failed:
    kind: ClassVar[CoordinatorState] = CoordinatorState.FAILED
    cause: str

    @property
    def detail(self) -> str:
        return self.cause


Phase = Stopped | Placing | Loading | Ready | Stopping | BackingOff | Failed
PhaseType = type[Stopped] | type[Placing] | type[Loading] | type[Ready] | type[Stopping] | type[BackingOff] | type[Failed]

# Every legal move. A variant may always go to `Failed` (its lifecycle raised what nobody
# expected) and to `Stopped` (the controller is stopping, or the model was unloaded meanwhile).
_ANYWHERE: frozenset[PhaseType] = frozenset({Failed, Stopped})
TRANSITIONS: dict[PhaseType, frozenset[PhaseType]] = {
    Stopped: frozenset({Placing}),
    Failed: frozenset({Placing}),  # the next request tries again
    # Placing again: unloaded and wanted back while it was being placed.
    Placing: frozenset({Placing, Loading, BackingOff}),
    Loading: frozenset({Ready, BackingOff}),
    Ready: frozenset({Stopping}),
    # Placing: a planned stop (unload, a larger context) that a request wants back at once.
    Stopping: frozenset({Placing, BackingOff}),
    BackingOff: frozenset({Placing}),
}


class InvalidTransition(AssertionError):
    """The lifecycle tried a move that `TRANSITIONS` does not hold: a bug, not a user's error."""


def check_transition(old: Phase, new: Phase) -> None:
    allowed = TRANSITIONS[type(old)] | _ANYWHERE
    if type(new) not in allowed:
        raise InvalidTransition(f"{type(old).__name__} → {type(new).__name__} is not a coordinator transition")
