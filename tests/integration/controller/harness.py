"""A real controller process over real agents, for the controller's integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.probe import free_loopback_port
from tests.integration.agent.harness import RunningAgent, running_agent, wait_for

LLAMAFLEET = str(Path(sys.executable).parent / "llamafleet")


@dataclass
class Fleet:
    controller: subprocess.Popen[bytes] | None
    url: str
    agents: list[RunningAgent]
    token_file: Path
    state_dir: Path
    models_dir: Path
    log_path: Path
    llama_cpp: Manifest
    heartbeat_s: float
    controller_args: tuple[str, ...] = ()
    shared_token: bool = True  # the deprecated fleet-wide --token-file; False: per-node credentials only

    def cli_argv(self, *args: str) -> list[str]:
        return [LLAMAFLEET, *args, "--controller", self.url]

    def cli(self, *args: str, timeout: float = 120, env_key: str | None = "") -> subprocess.CompletedProcess[str]:
        """Run the CLI; `env_key` sets LLAMAFLEET_API_KEY (None: unset, "": the fleet's own, if any).
        The fleet's admin key, if it has one, is always in LLAMAFLEET_ADMIN_KEY."""
        env = dict(os.environ)
        env.pop("LLAMAFLEET_API_KEY", None)
        env.pop("LLAMAFLEET_ADMIN_KEY", None)
        key = self.api_key if env_key == "" else env_key
        if key:
            env["LLAMAFLEET_API_KEY"] = key
        if self.admin_key:
            env["LLAMAFLEET_ADMIN_KEY"] = self.admin_key
        return subprocess.run(self.cli_argv(*args), capture_output=True, text=True, timeout=timeout, env=env)

    def _first_key(self, flag: str) -> str | None:
        if flag not in self.controller_args:
            return None
        path = Path(self.controller_args[self.controller_args.index(flag) + 1])
        return next(line for line in path.read_text().splitlines() if line and not line.startswith("#"))

    @property
    def api_key(self) -> str | None:
        return self._first_key("--api-key-file")

    @property
    def admin_key(self) -> str | None:
        return self._first_key("--admin-key-file")

    def nodes(self) -> list[dict[str, Any]]:
        result = self.cli("nodes", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def ps(self) -> list[dict[str, Any]]:
        result = self.cli("ps", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def node(self, address: str) -> dict[str, Any]:
        return next(n for n in self.nodes() if n["address"] == address)

    def start_controller(self, agents: list[str]) -> None:
        port = self.url.rsplit(":", 1)[1]
        argv = [LLAMAFLEET, "serve", "--listen", f"127.0.0.1:{port}",
                *(["--token-file", str(self.token_file)] if self.shared_token else []),
                "--models-dir", str(self.models_dir), "--state-dir", str(self.state_dir),
                "--llama-cpp", str(self.llama_cpp.install_dir), "--heartbeat-interval-s", str(self.heartbeat_s),
                "--headroom-fraction", "0"]
        for address in agents:
            argv += ["--agent", address]
        argv += self.controller_args
        with self.log_path.open("ab") as log:
            self.controller = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._answers(), 20, "the controller's API")

    def _answers(self) -> bool:
        assert self.controller is not None and self.controller.poll() is None, self.log_path.read_text()
        return self.cli("nodes", "--json", timeout=5).returncode == 0

    def stop_controller(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.controller is not None and self.controller.poll() is None:
            self.controller.send_signal(sig)
            try:
                self.controller.wait(timeout=15)
            except subprocess.TimeoutExpired:
                # Where it hangs (the controller logs its tasks on SIGUSR2, its threads on
                # SIGUSR1), then no orphan.
                self.controller.send_signal(signal.SIGUSR2)
                time.sleep(0.5)
                self.controller.send_signal(signal.SIGUSR1)
                time.sleep(1)
                self.controller.kill()
                self.controller.wait()
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-60:])
                raise AssertionError(f"the controller did not stop within 15 s of {sig.name}:\n{tail}") from None


@dataclass(frozen=True)
class AgentHost:
    """Where an agent runs: the address its gRPC port and rpc-server bind, and the command
    (e.g. `ip netns exec NS`) that puts it there before it execs the agent."""

    address: str
    argv_prefix: tuple[str, ...] = ()


def holder_stores(root: Path, model: Path, count: int, name: str = "gemma") -> tuple[tuple[str, ...], ...]:
    """`count` models dirs that each hold `model` (as NAME.gguf): one `--models-dir` per agent,
    as `running_fleet`'s `agent_args` (agents never share a models dir)."""
    args = []
    for i in range(count):
        store = root / f"store{i}"
        store.mkdir(parents=True)
        (store / f"{name}.gguf").symlink_to(model)
        args.append(("--models-dir", str(store)))
    return tuple(args)


@contextmanager
def running_fleet(tmp_path: Path, llama_cpp: Manifest, model: Path, *, agents: int = 2,
                  memory_limit: str | tuple[str, ...] = "260MiB", heartbeat_s: float = 0.3,
                  controller_args: tuple[str, ...] = (), model_names: tuple[str, ...] = ("gemma",),
                  agent_args: tuple[tuple[str, ...], ...] = (),
                  agent_llama_cpp: Manifest | None = None,
                  hosts: tuple[AgentHost, ...] = (),
                  agent_credentials: grpc.ChannelCredentials | None = None) -> Iterator[Fleet]:
    """`memory_limit`: one cap for every agent, or one per agent; `model_names`: names of the one GGUF;
    `agent_args`: more flags per agent, by index; `agent_llama_cpp`: the agents' build, when it is
    not the controller's `llama_cpp`; `hosts`: where each agent runs, by index (default: gRPC on
    127.0.0.1, agent #i's rpc-server on 127.0.0.<i + 2>); `agent_credentials`: the test's own gRPC
    channel to agents that use TLS (their flags go in `agent_args`, the controller's in `controller_args`)."""
    limits = (memory_limit,) * agents if isinstance(memory_limit, str) else memory_limit
    places = [hosts[i] if i < len(hosts) else None for i in range(agents)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    token = tmp_path / "token"
    token.write_text("fleet-token-for-tests\n")
    os.chmod(token, 0o600)
    models = tmp_path / "models"
    models.mkdir()
    for name in model_names:
        (models / f"{name}.gguf").symlink_to(model)
    with ExitStack() as stack:
        started = [stack.enter_context(running_agent(tmp_path / f"agent{i}", (agent_llama_cpp or llama_cpp).install_dir,
                                                     rpc_host=place.address if place else f"127.0.0.{i + 2}",
                                                     listen_host=place.address if place else "127.0.0.1",
                                                     argv_prefix=place.argv_prefix if place else (),
                                                     token_file=token, credentials=agent_credentials,
                                                     extra_args=("--memory-limit", limits[i],
                                                                 *(agent_args[i] if i < len(agent_args) else ()))))
                   for i, place in enumerate(places)]
        fleet = Fleet(None, f"http://127.0.0.1:{free_loopback_port()}", started, token, tmp_path / "controller",
                      models, tmp_path / "controller.log", llama_cpp, heartbeat_s, controller_args)
        fleet.start_controller([a.address for a in started])
        try:
            wait_for(lambda: all(n["state"] == "ready" and n["rpc_server"]["state"] == "running"
                                 for n in fleet.nodes()), 90, "every node ready")
            yield fleet
        finally:
            fleet.stop_controller()
