"""The controller's side of a pull: names on the agents, pacing, progress lines."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from unittest import mock

import pytest

from llamafleet.common.model_names import check_name
from llamafleet.controller.pull import CHUNK_BYTES, NodePull, Pull, PullManager, agent_name


@pytest.mark.parametrize(("model", "name"), [
    ("gemma", "gemma"), ("gemma:latest", "gemma"), ("gemma3:270m", "gemma3/270m"), ("me/tuned", "me/tuned"),
    ("me/tuned:q8_0", "me/tuned-q8_0"), ("registry.example.com/me/tuned:v2", "me/tuned-v2"),
])
def test_a_model_gets_a_name_the_agents_index_accepts(model: str, name: str) -> None:
    assert agent_name(model) == name
    check_name(name)


def test_the_file_is_read_in_chunks_and_paced_by_the_rate_limit(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    data = bytes(range(256)) * (CHUNK_BYTES // 256) * 3 + b"tail"
    path.write_bytes(data)
    manager = PullManager(mock.Mock(), mock.Mock(), mock.Mock(), rate_limit=4 * CHUNK_BYTES)

    async def read() -> list[bytes]:
        return [chunk async for chunk in manager._read(path, 100, len(data))]

    started = time.monotonic()
    chunks = asyncio.run(read())
    assert b"".join(chunks) == data[100:] and max(map(len, chunks)) == CHUNK_BYTES
    assert time.monotonic() - started >= 0.7  # 3 MiB at 4 MiB/s


def test_progress_says_each_change_of_a_node_then_the_outcome() -> None:
    async def run() -> list[dict[str, object]]:
        pull = Pull(1, "gemma:latest", Path("/m.gguf"), 100, "gemma", True, {"a:1": NodePull("a:1", "gemma", 100)},
                    sha256="f" * 64, state="pulling")

        async def transfer() -> None:
            part = pull.nodes["a:1"]
            part.state, part.completed, part.resumed_from = "sending", 40, 40
            pull.changes.bump()
            await asyncio.sleep(0.1)
            part.completed, part.sent, part.state = 100, 60, "done"
            pull.state = "done"
            pull.changes.bump()

        task = asyncio.ensure_future(transfer())
        lines = [line async for line in pull.progress(interval_s=0.05)]
        await task
        return lines

    lines = asyncio.run(run())
    assert [(line["status"], line.get("completed")) for line in lines] == [("pulling", 40), ("done", 100),
                                                                          ("success", None)]
    assert lines[-1]["nodes"] == [lines[1]] and lines[1]["sent_bytes"] == 60 and lines[1]["resumed_from"] == 40
