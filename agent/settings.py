"""The agent's one settings object (flags > LLAMAFLEET_* env > TOML file > defaults)."""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from llamafleet.common.paths import default_cache_dir, default_state_dir
from llamafleet.common.settings import parse_path, setting, split_host_port
from llamafleet.common.units import parse_size
from llamafleet.common.wire_limits import MAX_RPC_SERVERS

log = logging.getLogger(__name__)
DEFAULT_LISTEN = "127.0.0.1:50051"
RPC_LAYOUTS = ("shared", "per-device")


def parse_cache_max(value: object) -> int | None:
    """The rpc cache cap: a SIZE; `0` or `none` for no cap; `auto` (None) for the default."""
    word = value.strip().lower() if isinstance(value, str) else value
    if word in (None, "", "auto"):
        return None
    if word in ("none", "unlimited"):
        return 0
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"not a size: {value!r} (examples: 50GiB, 0 or none for no cap, auto)")
    return parse_size(value)


@dataclass(frozen=True)
class AgentSettings:
    listen: str = setting(DEFAULT_LISTEN, help="gRPC address HOST:PORT")
    metrics_listen: str = setting("", help="serve Prometheus metrics on HOST:PORT (empty: off)")
    token_file: Path | None = setting(None, parse=parse_path,
                                      help="this node's credential, installed by the operator (default: STATE/token, created 0600)")
    join: str = setting("", help="controller URL to join at first start (with a join token)")
    join_token: str = setting("", help="join token from `llamafleet token create` (prefer --join-token-file)")
    join_token_file: Path | None = setting(None, parse=parse_path, help="file holding the join token")
    advertise: str = setting("", help="gRPC HOST:PORT the controller dials (default: --listen)")
    tls_cert: Path | None = setting(None, parse=parse_path, help="server certificate (PEM) for TLS")
    tls_key: Path | None = setting(None, parse=parse_path, help="server key (PEM) for TLS")
    tls_client_ca: Path | None = setting(None, parse=parse_path, help="CA that client certificates must chain to (mTLS)")
    rpc_host: str = setting("127.0.0.1", help="IPv4 address the rpc-server binds")
    rpc_port: int = setting(50052, help="rpc-server port (the first one; rpc-server #i listens on rpc_port + i)")
    max_rpc_servers: int = setting(4, help="most rpc-servers the controller may ask for (one per model held here)")
    rpc_threads: int = setting(0, help="rpc-server CPU threads (0: its default)")
    devices: tuple[str, ...] = setting((), help="rpc-server devices, e.g. CUDA0,CUDA1 (default: all)")
    rpc_layout: str = setting("shared", help="GPUs per rpc-server: shared (one rpc-server serves them all, "
                                             "-d CUDA0,CUDA1) or per-device (one rpc-server per GPU)")
    rpc_cache: bool = setting(True, help="rpc-server local tensor cache (-c)")
    rpc_cache_max: int | None = setting(None, parse=parse_cache_max,
                                        help="cap on the rpc tensor cache: SIZE, 0/none for no cap "
                                             "(default auto: half of the cache's filesystem)")
    rpc_cache_check_s: float = setting(300.0, help="how often the cache keeper verifies new rpc cache entries "
                                                   "and enforces the cap (also after every staging)")
    max_coordinators: int = setting(2, help="most model coordinators (llama-server) the controller may run here, "
                                             "next to the weights; 0: none (no coordinator proxy either)")
    coordinator_port: int = setting(0, help="port of the coordinator proxy on rpc_host (0: any free port; set one "
                                            "when a firewall sits between the controller and this worker)")
    rpc_autostart: bool = setting(True, help="start the rpc-server with the agent")
    rpc_allow_wildcard: bool = setting(False, help="allow rpc_host 0.0.0.0 (rpc-server has no authentication)")
    memory_limit: int = setting(0, parse=parse_size, help="cap on memory advertised per device (0: none)")
    state_dir: Path | None = setting(None, parse=parse_path, help="builds, token, node id")
    cache_dir: Path | None = setting(None, parse=parse_path, help="rpc-server tensor cache")
    llama_cpp: Path | None = setting(None, parse=parse_path, help="adopt this llama.cpp install instead of a build")
    models_dir: Path | None = setting(None, parse=parse_path, help="GGUF files this worker holds (DIR/*.gguf, DIR/*/*.gguf), reported by sha256")
    models_rescan_s: float = setting(30.0, help="how often the models dir is listed again")
    heartbeat_interval_s: float = setting(2.0, help="WatchStatus heartbeat interval")
    restart_backoff_initial_s: float = setting(0.5, help="first restart delay after an rpc-server exit")
    restart_backoff_max_s: float = setting(30.0, help="cap on the restart delay")
    restart_max_failures: int = setting(5, help="consecutive failed starts before giving up (state failed)")
    healthy_reset_s: float = setting(30.0, help="running this long resets the backoff")

    def __post_init__(self) -> None:
        split_host_port(self.listen)
        if self.metrics_listen:
            split_host_port(self.metrics_listen)
        try:
            address = ipaddress.IPv4Address(self.rpc_host)
        except ValueError:
            raise ValueError(f"rpc_host must be an IPv4 address literal, not '{self.rpc_host}'") from None
        if address.is_unspecified and not self.rpc_allow_wildcard:
            raise ValueError(
                "rpc_host 0.0.0.0 exposes the unauthenticated rpc-server on every interface; "
                "give the worker's private address, or pass --rpc-allow-wildcard if you really mean it"
            )
        if self.rpc_layout not in RPC_LAYOUTS:
            raise ValueError(f"rpc_layout must be one of {', '.join(RPC_LAYOUTS)}, not '{self.rpc_layout}'")
        if not 0 < self.rpc_port < 65536:
            raise ValueError(f"rpc_port must be 1..65535, not {self.rpc_port}")
        if not 1 <= self.max_rpc_servers <= MAX_RPC_SERVERS:
            raise ValueError(f"max_rpc_servers must be 1..{MAX_RPC_SERVERS}, not {self.max_rpc_servers}")
        if self.rpc_port + self.max_rpc_servers - 1 > 65535:
            raise ValueError(f"rpc_port {self.rpc_port} + max_rpc_servers {self.max_rpc_servers} runs past port 65535")
        if self.rpc_threads < 0 or self.restart_max_failures < 1:
            raise ValueError("rpc_threads must be >= 0 and restart_max_failures >= 1")
        if not 0 <= self.max_coordinators <= MAX_RPC_SERVERS:
            raise ValueError(f"max_coordinators must be 0..{MAX_RPC_SERVERS}, not {self.max_coordinators}")
        if not 0 <= self.coordinator_port < 65536:
            raise ValueError(f"coordinator_port must be 0..65535, not {self.coordinator_port}")
        if self.models_rescan_s <= 0:
            raise ValueError("models_rescan_s must be > 0")
        if self.rpc_cache_check_s <= 0:
            raise ValueError("rpc_cache_check_s must be > 0")
        if self.heartbeat_interval_s <= 0 or self.restart_backoff_initial_s <= 0:
            raise ValueError("heartbeat_interval_s and restart_backoff_initial_s must be > 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.join:
            parsed = urllib.parse.urlsplit(self.join)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"join must be the controller's http(s):// URL, not '{self.join}'")
            if not self.join_token and self.join_token_file is None:
                raise ValueError("join needs a join token (join_token_file or join_token)")
            if self.token_file is not None:
                raise ValueError("join and token_file exclude each other: a joined node gets its credential "
                                 "from the controller")
            host, _ = split_host_port(self.advertised)
            if host in ("0.0.0.0", "::", ""):
                raise ValueError("listening on a wildcard address: give the address the controller dials "
                                 "with advertise HOST:PORT")
        elif self.join_token or self.join_token_file is not None:
            raise ValueError("a join token needs join (the controller's URL)")
        if self.advertise:
            split_host_port(self.advertise)
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")

    @property
    def state_path(self) -> Path:
        return self.state_dir or default_state_dir("agent")

    @property
    def cache_path(self) -> Path:
        return self.cache_dir or default_cache_dir("agent")

    @property
    def advertised(self) -> str:
        return self.advertise or self.listen

    @property
    def rpc_endpoint(self) -> str:
        return self.rpc_endpoint_of(0)

    def rpc_endpoint_of(self, index: int) -> str:
        return f"{self.rpc_host}:{self.rpc_port + index}"
