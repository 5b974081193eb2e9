"""The controller's one settings object (flags > LLAMAFLEET_* env > TOML file > defaults)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from llamafleet.common.settings import split_host_port
from llamafleet.common.paths import default_state_dir
from llamafleet.common.settings import parse_int, parse_path, setting
from llamafleet.common.units import parse_duration, parse_size


DEFAULT_LISTEN = "127.0.0.1:11434"
PARALLEL_AUTO = 0
PULL_RATE_MIN = 1024 * 1024


def parse_parallel(value: object) -> int:
    """`auto` (as many slots as memory allows) or a count; auto is stored as 0."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return PARALLEL_AUTO
    count = parse_int(value)
    if count < 1:
        raise ValueError(f"'{value}' is neither 'auto' nor a count of at least 1")
    return count


@dataclass(frozen=True)
class ControllerSettings:
    listen: str = setting(DEFAULT_LISTEN, help="HTTP address of the API (Ollama's port by default)")
    agents: tuple[str, ...] = setting((), help="an agent's gRPC HOST:PORT to watch", flag="--agent", repeat=True)
    shared_agent_token_file: Path | None = setting(
        None, parse=parse_path, help="DEPRECATED: one token sent to every node without a credential of its own")
    token_file: Path | None = setting(None, parse=parse_path, help="DEPRECATED: the old name of --shared-agent-token-file")
    agent_tls_ca: Path | None = setting(None, parse=parse_path, help="CA of the agents' TLS certificates")
    agent_tls_cert: Path | None = setting(None, parse=parse_path, help="client certificate for agents' mTLS")
    agent_tls_key: Path | None = setting(None, parse=parse_path, help="client key for agents' mTLS")
    models_dir: Path | None = setting(None, parse=parse_path, help="DIR/NAME.gguf is model NAME")
    models: tuple[str, ...] = setting((), help="serve PATH as model NAME (NAME=PATH)", flag="--model", repeat=True)
    ollama_models: Path | None = setting(None, parse=parse_path, help="an Ollama model store to read")
    llama_cpp: Path | None = setting(None, parse=parse_path, help="adopt this llama.cpp install")
    state_dir: Path | None = setting(None, parse=parse_path, help="SQLite state and builds")
    heartbeat_interval_s: float = setting(2.0, help="heartbeat interval asked of every agent")
    missed_heartbeats: int = setting(3, help="a node is unreachable after this many missed heartbeats")
    headroom_fraction: float = setting(0.05, help="fraction of each device kept free by placement")
    headroom_min: int = setting(0, parse=parse_size, help="at least this much kept free per device")
    default_ctx: int = setting(4096, help="context per request when a plan names none")
    parallel: int = setting(PARALLEL_AUTO, parse=parse_parallel,
                            help="request slots per coordinator: a count, or auto (as many as the placed "
                                 "memory holds, up to max_parallel) [default: auto]")
    max_parallel: int = setting(8, help="most request slots --parallel auto gives a coordinator")
    prompt_cache_mib: int = setting(0, help="llama-server's host-RAM prompt cache per coordinator, MiB "
                                            "(llama.cpp's --cache-ram; -1 no limit) [default: 0, off: over RPC "
                                            "it copies idle slots' KV back across the network]")
    keep_alive: float = setting(300.0, parse=parse_duration,
                                help="how long an idle model stays loaded (\"5m\", seconds; negative: forever)")
    coordinator: str = setting("auto", help="where a model's llama-server runs: auto (on the worker with the "
                                            "largest share when its agent can, else here), worker (refuse "
                                            "otherwise), controller, or a node's HOST:PORT")
    resume: bool = setting(True, help="a stream whose coordinator broke goes on where it stopped once the model "
                                      "is ready again (--no-resume: it ends with the error line)")
    resume_timeout: float = setting(120.0, parse=parse_duration,
                                    help="the longest a broken stream waits for its model (\"2m\", seconds)")
    resume_attempts: int = setting(2, help="how often one answer may be resumed")
    load_timeout_s: float = setting(600.0, help="a coordinator must be healthy within this after its start")
    max_request_bytes: int = setting(8 * 2**20, parse=parse_size, help="largest request body the gateway accepts")
    origins: tuple[str, ...] = setting((), help="browser origins allowed on the Ollama/OpenAI routes besides "
                                               "pages on this host and app webviews, as OLLAMA_ORIGINS "
                                               "(comma-separated; `*` wildcards: https://*.example.com, *; "
                                               "OLLAMA_ORIGINS itself is read when LLAMAFLEET_ORIGINS is not set)",
                                       fallback_env=("OLLAMA_ORIGINS",))
    ollama_nodes: tuple[str, ...] = setting((), help="an Ollama server (URL) in the pool for models one node holds",
                                            flag="--ollama-node", repeat=True)
    ollama_node_memory: int = setting(0, parse=parse_size,
                                      help="memory of one Ollama pool node (0: trust what the node lists)")
    routes: tuple[str, ...] = setting((), help="MODEL=pool or MODEL=fleet: override the routing",
                                      flag="--route", repeat=True)
    pull_rate_limit: int = setting(0, parse=parse_size,
                                   help="most bytes a second `llamafleet pull` sends to each node, e.g. 50MiB "
                                        "(0: no limit)")
    api_key_file: Path | None = setting(None, parse=parse_path,
                                        help="API keys (one per line) the gateway requires as Bearer tokens")
    admin_key_file: Path | None = setting(None, parse=parse_path,
                                          help="admin keys (one per line) for the control routes; without one "
                                               "only loopback clients may use them")

    def __post_init__(self) -> None:
        split_host_port(self.listen)
        if self.coordinator not in ("auto", "worker", "controller"):
            try:
                split_host_port(self.coordinator)
            except ValueError:
                raise ValueError(f"coordinator must be auto, worker, controller or a node's HOST:PORT, "
                                 f"not '{self.coordinator}'") from None
        for agent in self.agents:
            split_host_port(agent)
        if self.shared_agent_token_file and self.token_file and self.shared_agent_token_file != self.token_file:
            raise ValueError("shared_agent_token_file and its old name token_file name different files")
        if self.heartbeat_interval_s <= 0 or self.missed_heartbeats < 1:
            raise ValueError("heartbeat_interval_s must be > 0 and missed_heartbeats >= 1")
        if not 0 <= self.headroom_fraction < 1:
            raise ValueError("headroom_fraction must be in [0, 1)")
        if self.prompt_cache_mib < -1:
            raise ValueError("prompt_cache_mib must be -1 (no limit), 0 (off) or a size in MiB")
        if self.default_ctx < 1 or self.parallel < 0 or self.max_parallel < 1:
            raise ValueError("default_ctx and max_parallel must be >= 1")
        if self.resume_timeout <= 0 or self.resume_attempts < 0:
            raise ValueError("resume_timeout must be > 0 and resume_attempts >= 0")
        if self.load_timeout_s <= 0 or self.max_request_bytes < 1024:
            raise ValueError("load_timeout_s must be > 0 and max_request_bytes at least 1KiB")
        if 0 < self.pull_rate_limit < PULL_RATE_MIN:
            # A node gives up a push that sends nothing for a minute; a 1 MiB message must come sooner.
            raise ValueError("pull_rate_limit must be 0 (no limit) or at least 1MiB (a second)")
        for url in self.ollama_nodes:
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"ollama node {url!r} must be an http(s):// URL")

    @property
    def state_path(self) -> Path:
        return self.state_dir or default_state_dir("controller")

    @property
    def shared_token_path(self) -> Path | None:
        """The deprecated fleet-wide agent token, if configured (never read implicitly)."""
        return self.shared_agent_token_file or self.token_file

    @property
    def unreachable_after_s(self) -> float:
        return self.heartbeat_interval_s * self.missed_heartbeats
