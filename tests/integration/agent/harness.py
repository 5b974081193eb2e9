"""Start a real `llamafleet-agent serve` process and talk to it like systemd and the controller do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import grpc

from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.proto.v1 import agent_pb2 as pb
from llamafleet.proto.v1 import agent_pb2_grpc as pb_grpc

AGENT = str(Path(sys.executable).parent / "llamafleet-agent")
T = TypeVar("T")


def wait_for(predicate: Callable[[], T | Literal[False] | None], timeout_s: float, what: str,
             interval_s: float = 0.05) -> T:
    # Only a truthy value comes back, so `lambda: cond and value` waits for (and returns) the value.
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class NotifySocket:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def fields(self) -> list[str]:
        return [line for message in self.drain() for line in message.splitlines()]

    def close(self) -> None:
        self.sock.close()


@dataclass
class RunningAgent:
    proc: subprocess.Popen[bytes]
    address: str
    token: str
    rpc_endpoint: str
    state_dir: Path
    log_path: Path
    credentials: grpc.ChannelCredentials | None = None
    argv: tuple[str, ...] = ()
    channel: grpc.Channel = field(init=False)
    stub: pb_grpc.AgentServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = (grpc.secure_channel(self.address, self.credentials) if self.credentials
                        else grpc.insecure_channel(self.address))
        self.stub = pb_grpc.AgentServiceStub(self.channel)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]

    def status(self) -> pb.AgentStatus:
        return self.stub.GetStatus(pb.GetStatusRequest(), metadata=self.metadata, timeout=5).status

    def rpc(self) -> pb.RpcServerStatus:
        return self.status().rpc_server

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start_again(self) -> None:
        """Start the agent again with the same arguments (after a test killed it)."""
        assert self.proc.poll() is not None, "the agent is still running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(list(self.argv), stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: _answers(self), 20, "the restarted agent's gRPC port")


@contextmanager
def running_agent(tmp_path: Path, llama_cpp_dir: Path, *, rpc_host: str = "127.0.0.2",
                  extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                  credentials: grpc.ChannelCredentials | None = None,
                  token_file: Path | None = None, credential: str = "token",
                  listen_host: str = "127.0.0.1", argv_prefix: tuple[str, ...] = ()) -> Iterator[RunningAgent]:
    """`credential`: the file under STATE that will hold the agent's credential (`credential` once joined);
    `argv_prefix`: a command that runs the agent elsewhere and then execs it (the benchmarks'
    `ip netns exec NS`), so that the process started is still the agent itself."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    listen = f"{listen_host}:{free_loopback_port()}"
    rpc_port = free_loopback_port()
    state = tmp_path / "state"
    log_path = tmp_path / "agent.log"
    argv = [*argv_prefix, AGENT, "serve", "--listen", listen, "--state-dir", str(state), "--cache-dir", str(tmp_path / "cache"),
            "--llama-cpp", str(llama_cpp_dir), "--rpc-host", rpc_host, "--rpc-port", str(rpc_port), *extra_args]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    agent: RunningAgent | None = None
    try:
        token_path = token_file or state / credential
        wait_for(lambda: token_path.exists() or proc.poll() is not None, 20, "the agent's token")
        assert proc.poll() is None, f"agent exited: {log_path.read_text()}"
        agent = RunningAgent(proc, listen, token_path.read_text().strip(), f"{rpc_host}:{rpc_port}", state, log_path,
                             credentials, tuple(argv))
        wait_for(lambda: _answers(agent), 20, "the agent's gRPC port")
        yield agent
    finally:
        proc = agent.proc if agent is not None else proc  # a test may have started it again
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(agent: RunningAgent) -> bool:
    try:
        agent.status()
    except grpc.RpcError:
        return False
    return True
