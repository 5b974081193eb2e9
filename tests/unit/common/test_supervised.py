"""The supervised-task primitive: a coroutine that raises is logged once, reported, and retried with back-off."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from llamafleet.common.restart import RestartPolicy
from llamafleet.common.supervised import Supervised, TaskFailure

QUICK = RestartPolicy(initial_s=0.05, max_s=0.2, max_failures=1_000, healthy_reset_s=30)


def test_a_raising_body_is_reported_once_with_its_traceback_and_retried_with_capped_back_off(
        caplog: pytest.LogCaptureFixture) -> None:
    runs: list[float] = []
    events: list[tuple[str, str, dict[str, Any]]] = []
    told: list[TaskFailure] = []

    async def body() -> None:
        runs.append(asyncio.get_running_loop().time())
        raise OSError(28, "No space left on device")

    async def scenario() -> None:
        task = Supervised("disk writer", body, on_failure=lambda f, e: told.append(f), restart=QUICK,
                          events=lambda kind, subject, message, **data: events.append((kind, subject, data)))
        await asyncio.sleep(1.0)
        await task.stop()
        assert task.failure is not None and "No space left on device" in task.failure.cause

    with caplog.at_level(logging.ERROR, logger="llamafleet.common.supervised"):
        asyncio.run(scenario())
    # 0.05, 0.1, 0.2, 0.2, …: a handful of runs in a second, never a hot loop.
    assert 3 <= len(runs) <= 9
    assert all(b - a >= 0.04 for a, b in zip(runs, runs[1:]))
    assert len(told) == len(events) == len(runs)
    assert events[0][0] == "task.failed" and events[0][2]["retry_in_s"] == pytest.approx(0.05)
    traced = [r for r in caplog.records if r.exc_info]
    assert len(traced) == 1  # the same cause again is one line, not another traceback
    assert len(caplog.records) == len(runs)


def test_without_a_policy_it_stays_failed_and_a_broken_hook_does_not_hide_the_failure() -> None:
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        raise KeyError("boom")

    def broken_hook(failure: TaskFailure, exc: Exception) -> None:
        raise RuntimeError("the hook is broken too")

    async def scenario() -> Supervised:
        task = Supervised("once", body, on_failure=broken_hook)
        await asyncio.sleep(0.3)
        return task

    task = asyncio.run(scenario())
    assert runs == 1 and not task.running
    assert task.failure is not None and task.failure.cause == "KeyError: 'boom'" and task.failure.retry_in_s is None


def test_cancelling_ends_it_without_a_failure() -> None:
    async def body() -> None:
        await asyncio.sleep(60)

    async def scenario() -> Supervised:
        task = Supervised("sleeper", body, restart=QUICK)
        await asyncio.sleep(0.05)
        await task.stop()
        return task

    task = asyncio.run(scenario())
    assert task.task.cancelled() and task.failure is None
