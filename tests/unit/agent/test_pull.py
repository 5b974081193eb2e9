"""Pulls into the models dir (agent/pull.py): resume, verification, refusals, and the index seeing the file at once."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from llamafleet.agent import models as models_module
from llamafleet.agent.models import ModelIndex
from llamafleet.agent.pull import (
    DigestMismatch,
    NameTaken,
    NotEnoughSpace,
    Offer,
    PushBusy,
    PushInterrupted,
    PushRefused,
    Received,
    Receiver,
    Target,
)
from llamafleet.common.errors import UsageError
from llamafleet.common.model_names import check_name

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def pieces(data: bytes, size: int = 100_000) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


async def stream(chunks: Iterable[bytes], pause_s: float = 0.0) -> AsyncIterator[bytes]:
    for chunk in chunks:
        if pause_s:
            await asyncio.sleep(pause_s)
        yield chunk


def setup(tmp_path: Path, free: int | None = None) -> tuple[ModelIndex, Receiver]:
    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    index = ModelIndex(root, tmp_path / "state")
    receiver = Receiver(index, free=(lambda _: free) if free is not None else lambda _: 1 << 40)
    return index, receiver


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


@pytest.mark.parametrize("name", ["", "../gemma", "/etc/passwd", ".hidden", "a/.b", "a/b/c", "a..b", "a\\b",
                                  "x y", "a/", "/a", "é", "x" * 256])
def test_names_outside_the_index_grammar_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="invalid model file name"):
        check_name(name)


def test_names_the_index_uses_are_accepted() -> None:
    for name in ("gemma", "llama3/8b-q8_0", "gemma3/270m", "Qwen_2.5", "_x"):
        check_name(name)


def test_a_push_lands_verified_and_ready_without_a_rescan_or_a_rehash(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    index, receiver = setup(tmp_path)
    offer = Offer("family/gemma", SHA, len(PAYLOAD))

    async def run() -> None:
        prepared = await receiver.prepare(offer)
        assert (prepared.have_bytes, prepared.held) == (0, None)
        received = await receiver.receive(offer, 0, stream(pieces(PAYLOAD)))
        assert (received.received_bytes, received.already_held) == (len(PAYLOAD), False)
        assert (received.model.name, received.model.sha256, received.model.state) == ("family/gemma", SHA, "ready")
        assert [(m.name, m.state) for m in index.files] == [("family/gemma", "ready")]

        def no_hash(*_: object) -> str:
            raise AssertionError("a received file is never read again")

        monkeypatch.setattr(models_module, "sha256_file", no_hash)
        await index.refresh()  # the digest is in the cache: the rescan reads nothing
        assert [(m.name, m.sha256) for m in index.files] == [("family/gemma", SHA)]
        again = await receiver.prepare(offer)  # held now: nothing to send
        assert again.held is not None and again.held.name == "family/gemma"

    asyncio.run(run())
    assert (tmp_path / "models" / "family" / "gemma.gguf").read_bytes() == PAYLOAD
    assert hidden(tmp_path / "models") == []  # no partial, no record left
    assert ModelIndex(tmp_path / "models", tmp_path / "state")._cache.get(index.files[0].key) == SHA  # saved


def test_an_interrupted_push_resumes_where_it_stopped(tmp_path: Path) -> None:
    index, receiver = setup(tmp_path)
    offer = Offer("gemma", SHA, len(PAYLOAD))
    target = Target.of(index.root, "gemma")

    async def run() -> None:
        with pytest.raises(PushInterrupted, match="kept for a resume"):
            await receiver.receive(offer, 0, stream(pieces(PAYLOAD[:300_000])))
        assert target.partial.stat().st_size == 300_000 and target.record.exists()
        assert index.files == ()  # hidden: not a model yet
        prepared = await receiver.prepare(offer)
        assert prepared.have_bytes == 300_000
        received = await receiver.receive(offer, 200_000, stream(pieces(PAYLOAD[200_000:])))  # before the end is fine
        assert received.received_bytes == len(PAYLOAD) - 200_000
        with pytest.raises(PushRefused, match="cannot resume"):
            await receiver.receive(Offer("other", SHA[::-1], 10), 5, stream([]))

    asyncio.run(run())
    assert (index.root / "gemma.gguf").read_bytes() == PAYLOAD
    assert hidden(index.root) == []


def test_a_stalled_push_gives_up_and_keeps_its_bytes(tmp_path: Path) -> None:
    index, _ = setup(tmp_path)
    receiver = Receiver(index, free=lambda _: 1 << 40, idle_timeout_s=0.2)
    offer = Offer("gemma", SHA, len(PAYLOAD))

    async def run() -> None:
        async def stalls() -> AsyncIterator[bytes]:
            yield PAYLOAD[:1000]
            await asyncio.sleep(30)
            yield b""

        with pytest.raises(PushInterrupted, match="no data for 0 s"):
            await receiver.receive(offer, 0, stalls())
        assert (await receiver.prepare(offer)).have_bytes == 1000
        # The turn is free again: a second push of the name is not refused as busy.
        await receiver.receive(offer, 1000, stream([PAYLOAD[1000:]]))

    asyncio.run(run())


def test_kept_bytes_of_another_file_are_not_resumed(tmp_path: Path) -> None:
    index, receiver = setup(tmp_path)
    other = bytes(len(PAYLOAD))

    async def run() -> None:
        with pytest.raises(PushInterrupted):
            await receiver.receive(Offer("gemma", hashlib.sha256(other).hexdigest(), len(other)), 0,
                                   stream([other[:5000]]))
        offer = Offer("gemma", SHA, len(PAYLOAD))
        assert (await receiver.prepare(offer)).have_bytes == 0
        with pytest.raises(PushRefused, match="keeps 0 bytes"):
            await receiver.receive(offer, 5000, stream([PAYLOAD[5000:]]))
        await receiver.receive(offer, 0, stream(pieces(PAYLOAD)))

    asyncio.run(run())
    assert (index.root / "gemma.gguf").read_bytes() == PAYLOAD


def test_a_wrong_sha256_leaves_nothing_usable(tmp_path: Path) -> None:
    index, receiver = setup(tmp_path)
    corrupted = PAYLOAD[:-1] + b"\x00"

    async def run() -> None:
        with pytest.raises(DigestMismatch, match="nothing was kept"):
            await receiver.receive(Offer("gemma", SHA, len(PAYLOAD)), 0, stream(pieces(corrupted)))
        with pytest.raises(UsageError, match="more than the"):
            await receiver.receive(Offer("gemma", SHA, len(PAYLOAD)), 0, stream(pieces(PAYLOAD + b"x")))
        await index.refresh()

    asyncio.run(run())
    assert list(index.root.iterdir()) == [] and index.files == ()


def test_too_little_disk_is_refused_naming_what_is_needed_and_what_is_free(tmp_path: Path) -> None:
    index, receiver = setup(tmp_path, free=600_000)
    offer = Offer("gemma", SHA, len(PAYLOAD))

    async def run() -> None:
        with pytest.raises(NotEnoughSpace) as refused:
            await receiver.prepare(offer)
        assert str(refused.value) == f"not enough disk space for gemma in {index.root}: needs 1.0 MiB, 585.9 KiB free"
        with pytest.raises(NotEnoughSpace):
            await receiver.receive(offer, 0, stream(pieces(PAYLOAD)))
        assert hidden(index.root) == []  # refused before a byte was written
        # With 600 KB kept from an earlier try, the rest fits.
        roomy = Receiver(index, free=lambda _: 1 << 40)
        with pytest.raises(PushInterrupted):
            await roomy.receive(offer, 0, stream([PAYLOAD[:600_000]]))
        assert (await receiver.prepare(offer)).have_bytes == 600_000
        await receiver.receive(offer, 600_000, stream([PAYLOAD[600_000:]]))

    asyncio.run(run())


def test_one_push_per_file_at_a_time(tmp_path: Path) -> None:
    index, receiver = setup(tmp_path)
    offer = Offer("gemma", SHA, len(PAYLOAD))

    async def run() -> None:
        first = asyncio.ensure_future(receiver.receive(offer, 0, stream(pieces(PAYLOAD), pause_s=0.05)))
        await asyncio.sleep(0.1)
        with pytest.raises(PushBusy, match="already under way"):
            await receiver.receive(offer, 0, stream([]))
        await first

    asyncio.run(run())


def test_a_different_file_under_the_name_is_never_overwritten(tmp_path: Path) -> None:
    index, receiver = setup(tmp_path)
    (index.root / "gemma.gguf").write_bytes(b"the operator's own file")
    offer = Offer("gemma", SHA, len(PAYLOAD))

    async def run() -> None:
        with pytest.raises(PushRefused, match="is not hashed yet"):
            await receiver.prepare(offer)
        await index.refresh()
        with pytest.raises(NameTaken, match="already holds another file"):
            await receiver.prepare(offer)
        with pytest.raises(NameTaken):
            await receiver.receive(offer, 0, stream(pieces(PAYLOAD)))

    asyncio.run(run())
    assert (index.root / "gemma.gguf").read_bytes() == b"the operator's own file"


def test_a_file_held_under_another_name_is_not_sent_again(tmp_path: Path) -> None:
    index, receiver = setup(tmp_path)
    (index.root / "mine.gguf").write_bytes(PAYLOAD)

    async def run() -> None:
        await index.refresh()
        offer = Offer("gemma", SHA, len(PAYLOAD))
        prepared = await receiver.prepare(offer)
        assert prepared.held is not None and prepared.held.name == "mine"

        async def never() -> AsyncIterator[bytes]:
            raise AssertionError("nothing is read for a file already held")
            yield b""  # pragma: no cover

        received = await receiver.receive(offer, 0, never())
        assert received.already_held and received.received_bytes == 0

    asyncio.run(run())
    assert sorted(p.name for p in index.root.iterdir()) == ["mine.gguf"]


def test_a_listing_taken_before_the_file_arrived_does_not_forget_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    index, receiver = setup(tmp_path)
    listed, release = threading.Event(), threading.Event()
    real_scan = models_module.scan

    def slow_scan(*args: object) -> models_module.ScanResult:
        result = real_scan(*args)  # type: ignore[arg-type]
        listed.set()
        release.wait(10)
        return result

    monkeypatch.setattr(models_module, "scan", slow_scan)

    async def run() -> None:
        rescan = asyncio.ensure_future(index.refresh())
        await asyncio.to_thread(listed.wait, 10)  # the listing is taken: the file is not in it
        push = asyncio.ensure_future(receiver.receive(Offer("gemma", SHA, len(PAYLOAD)), 0, stream(pieces(PAYLOAD))))
        await asyncio.sleep(0.3)
        release.set()
        await asyncio.gather(rescan, push)
        assert [(m.name, m.state) for m in index.files] == [("gemma", "ready")]
        monkeypatch.setattr(models_module, "scan", real_scan)
        monkeypatch.setattr(models_module, "sha256_file", lambda *_: pytest.fail("the digest was forgotten"))
        await index.refresh()
        assert [(m.name, m.state) for m in index.files] == [("gemma", "ready")]

    asyncio.run(run())


def test_a_partial_another_process_writes_is_refused_as_busy(tmp_path: Path) -> None:
    """Two agents sharing one models dir (an NFS mount): the second may not interleave its bytes."""
    index, receiver = setup(tmp_path)
    offer = Offer("gemma", SHA, len(PAYLOAD))
    target = Target.of(index.root, "gemma")
    target.partial.write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(target.partial)!r}, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"

        async def run() -> None:
            with pytest.raises(PushBusy, match="another process is writing .*shared with another node"):
                await receiver.receive(offer, 0, stream(pieces(PAYLOAD)))

        asyncio.run(run())
    finally:
        holder.communicate("")
    assert target.partial.read_bytes() == b""  # untouched
    asyncio.run(receiver.receive(offer, 0, stream(pieces(PAYLOAD))))  # free again once it let go
    assert (index.root / "gemma.gguf").read_bytes() == PAYLOAD


def test_a_push_the_caller_abandons_after_it_began_keeps_its_bytes_and_frees_the_name(tmp_path: Path) -> None:
    index, receiver = setup(tmp_path)
    offer = Offer("gemma", SHA, len(PAYLOAD))

    async def run() -> None:
        push = await receiver.begin(offer, 0)
        assert not isinstance(push, Received)
        with pytest.raises(PushBusy):
            await receiver.begin(offer, 0)  # the file's turn is taken while the push is open
        await push.end()  # the caller went away after `accepted`, before sending a byte
        await push.end()  # twice is harmless
        again = await receiver.begin(offer, 0)
        assert not isinstance(again, Received)
        await again.receive(stream(pieces(PAYLOAD)))

    asyncio.run(run())
    assert (index.root / "gemma.gguf").read_bytes() == PAYLOAD
