from __future__ import annotations

import os
import socket
from pathlib import Path

from llamafleet.common.systemd import Notifier


def test_without_notify_socket_everything_is_silent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_ping_interval_s is None
    notifier.ready("x")
    notifier.watchdog()


def test_messages_reach_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
        notifier.ready("rpc-server running")
        notifier.watchdog()
        notifier.stopping()
        got = [sock.recv(1024).decode() for _ in range(3)]
    assert got == ["READY=1\nSTATUS=rpc-server running", "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"]
    assert notifier.watchdog_ping_interval_s == 2.0


def test_abstract_socket(tmp_path: Path) -> None:
    name = f"llamafleet-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(1024) == b"STATUS=hello"


def test_watchdog_meant_for_another_pid_is_ignored(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_ping_interval_s is None


def test_gone_socket_is_not_fatal(tmp_path: Path) -> None:
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")}).ready("x")
