"""Parse the banner `ggml-rpc-server` prints when it starts.

    Starting RPC server v7.0.0
      endpoint       : 127.0.0.1:50052
      local cache    : /var/cache/llamafleet/rpc
    Devices:
      CPU: AMD EPYC 7B13 (23976 MiB, 21011 MiB free)
      transport      : TCP

The banner is the rpc-server's own statement of what it serves; readiness is judged from it
(and from its listening socket), never by connecting to it: it serves one client at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MIB = 1024 * 1024

_VERSION = re.compile(r"^Starting RPC server v(\d+\.\d+\.\d+)")
_FIELD = re.compile(r"^\s+(endpoint|local cache|transport)\s*:\s*(.*?)\s*$")
_DEVICE = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$")


@dataclass(frozen=True)
class BannerDevice:
    name: str
    description: str
    total_bytes: int
    free_bytes: int


@dataclass
class RpcBanner:
    """Fed line by line; `complete` once the device list has ended."""

    protocol_version: str = ""
    endpoint: str = ""
    cache_dir: str = ""
    transport: str = ""
    devices: list[BannerDevice] = field(default_factory=list)
    _in_devices: bool = False
    _devices_done: bool = False

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if match := _VERSION.match(line):
            self.protocol_version = match.group(1)
            return
        if line.startswith("Devices:"):
            self._in_devices = True
            return
        if match := _FIELD.match(line):
            key, value = match.groups()
            if key == "endpoint":
                self.endpoint = value
            elif key == "local cache":
                self.cache_dir = "" if value == "n/a" else value
            else:
                self.transport = value
                self._devices_done = True
            if self._in_devices:
                self._in_devices = False
                self._devices_done = True
            return
        if self._in_devices and (match := _DEVICE.match(line)):
            name, description, total, free = match.groups()
            self.devices.append(BannerDevice(name, description, int(total) * MIB, int(free) * MIB))

    @property
    def protocol_major(self) -> int | None:
        return int(self.protocol_version.split(".")[0]) if self.protocol_version else None

    @property
    def complete(self) -> bool:
        """Version, endpoint and a finished device list were all seen."""
        return bool(self.protocol_version and self.endpoint and self.devices and self._devices_done)

    def end_devices(self) -> None:
        """Older servers print no line after the device list: the caller ends it (socket seen)."""
        if self.devices:
            self._in_devices = False
            self._devices_done = True
