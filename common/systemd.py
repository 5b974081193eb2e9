"""sd_notify without libsystemd: READY, STATUS, WATCHDOG, STOPPING over $NOTIFY_SOCKET.

Without $NOTIFY_SOCKET (not run by systemd) every call is a silent no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written '@name' and addressed with a leading NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._watchdog_s = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1_000_000
        except ValueError:
            # A malformed value from the environment: behave as if no watchdog was asked for.
            log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
            return None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdog_ping_interval_s(self) -> float | None:
        """Half the watchdog timeout, as sd_watchdog_enabled(3) recommends; None when off."""
        return self._watchdog_s / 2 if self._watchdog_s and self.enabled else None

    def notify(self, *fields: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            # systemd going away must not take the daemon down; the next message may get through.
            log.warning("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")
