"""Per-node credentials with real processes: join, rotation, removal, and the admin's node add."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.proto.v1 import agent_pb2 as pb
from llamafleet.proto.v1 import agent_pb2_grpc as pb_grpc
from tests.integration.agent.harness import AGENT, running_agent, wait_for
from tests.integration.controller.harness import Fleet

pytestmark = pytest.mark.integration


@contextmanager
def controller(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    """A controller with no shared token: every node needs a credential of its own."""
    models = tmp_path / "models"
    models.mkdir(parents=True)
    (models / "gemma.gguf").symlink_to(test_model)
    fleet = Fleet(None, f"http://127.0.0.1:{free_loopback_port()}", [], tmp_path / "no-token", tmp_path / "state",
                  models, tmp_path / "controller.log", llama_cpp, 0.3, shared_token=False)
    fleet.start_controller([])
    try:
        yield fleet
    finally:
        fleet.stop_controller()


def post(url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def refused(call: Any) -> bool:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def test_join_then_rotate_then_remove(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with controller(tmp_path / "c", llama_cpp, test_model) as fleet:
        created = fleet.cli("token", "create", "--ttl", "1h")
        assert created.returncode == 0, created.stderr
        join_token = created.stdout.strip()
        assert join_token.startswith("lfjoin_") and "until" in created.stderr
        token_file = tmp_path / "join-token"
        token_file.write_text(join_token + "\n")
        with running_agent(tmp_path / "agent", llama_cpp.install_dir, credential="credential",
                           extra_args=("--join", fleet.url, "--join-token-file", str(token_file))) as agent:
            wait_for(lambda: any(n["address"] == agent.address and n["state"] == "ready"
                                 and n["rpc_server"]["state"] == "running" for n in fleet.nodes()), 30, "joined node ready")
            issued = agent.state_dir / "credential"
            assert stat.S_IMODE(issued.stat().st_mode) == 0o600
            assert not (agent.state_dir / "token").exists(), "a joining agent made a credential of its own"
            # The join token was good for one join: spent now.
            again, answer = post(fleet.url, "/llamafleet/v1/join",
                                 {"token": join_token, "address": "127.0.0.1:1", "node_id": "x"})
            assert again == 403 and answer == {"error": "join token already used"}

            old = agent.token
            rotated = fleet.cli("node", "rotate", agent.address)
            assert rotated.returncode == 0 and "confirmed by the agent" in rotated.stdout, rotated.stderr
            new = issued.read_text().strip()
            assert new != old
            assert refused(agent.status), "the old credential still works after a rotation"
            agent.token = new
            assert agent.status().node.node_id
            time.sleep(1.0)
            assert fleet.node(agent.address)["state"] == "ready"

            removed = fleet.cli("node", "remove", agent.address)
            assert removed.returncode == 0 and "revoked at the agent" in removed.stdout, removed.stderr
            assert refused(agent.status), "a removed node's credential still works at the agent"
            assert not issued.exists() and "removed this node" in agent.log()
            # No secret ever reaches a log.
            logs = fleet.log_path.read_text() + agent.log()
            assert old not in logs and new not in logs and join_token not in logs


def test_join_refusals_are_one_line_with_the_reason(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with controller(tmp_path, llama_cpp, test_model) as fleet:
        assert post(fleet.url, "/llamafleet/v1/join", {"token": "lfjoin_guess", "address": "127.0.0.1:1"}) \
            == (403, {"error": "unknown join token"})
        short = fleet.cli("token", "create", "--ttl", "1s").stdout.strip()
        time.sleep(1.2)
        status, answer = post(fleet.url, "/llamafleet/v1/join", {"token": short, "address": "127.0.0.1:1"})
        assert status == 403 and answer["error"].startswith("join token expired at ")
        assert post(fleet.url, "/llamafleet/v1/join", {"address": "127.0.0.1:1"}) \
            == (400, {"error": "'token' must be a non-empty string"})
        status, answer = post(fleet.url, "/llamafleet/v1/join", {"token": short, "address": "nope"})
        assert status == 400 and "invalid agent address" in answer["error"]
        bad_ttl = fleet.cli("token", "create", "--ttl", "200h")
        assert bad_ttl.returncode == 1 and bad_ttl.stderr.startswith("error: a join token lives")
        assert "Traceback" not in fleet.log_path.read_text() and short not in fleet.log_path.read_text()


def test_a_refused_join_token_leaves_the_agent_up_and_saying_why(tmp_path: Path, llama_cpp: Manifest,
                                                                   test_model: Path) -> None:
    with controller(tmp_path / "c", llama_cpp, test_model) as fleet:
        token_file = tmp_path / "join-token"
        token_file.write_text("lfjoin_not-a-real-one\n")
        listen = f"127.0.0.1:{free_loopback_port()}"
        log = tmp_path / "agent.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([AGENT, "serve", "--listen", listen, "--state-dir", str(tmp_path / "state"),
                                     "--no-rpc-autostart", "--llama-cpp", str(llama_cpp.install_dir),
                                     "--join", fleet.url, "--join-token-file", str(token_file)],
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "refused the join: unknown join token" in log.read_text(), 20, "the refusal in the log")
            assert proc.poll() is None and fleet.nodes() == []
            with grpc.insecure_channel(listen) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                assert refused(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=5)), \
                    "an agent that never joined accepts calls"
            assert not (tmp_path / "state" / "token").exists() and "lfjoin_not-a-real-one" not in log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)


def test_the_admin_adds_a_node_with_the_credential_the_agent_made(tmp_path: Path, llama_cpp: Manifest,
                                                                  test_model: Path) -> None:
    with controller(tmp_path / "c", llama_cpp, test_model) as fleet, \
            running_agent(tmp_path / "agent", llama_cpp.install_dir) as agent:
        bare = fleet.cli("node", "add", agent.address)
        assert bare.returncode == 0
        time.sleep(1.0)
        node = fleet.node(agent.address)
        assert node["state"] == "unreachable" and node["error"].startswith("no credential for this node")
        assert "no credential for this node" in fleet.cli("nodes").stdout
        added = fleet.cli("node", "add", agent.address, "--credential-file", str(agent.state_dir / "token"))
        assert added.returncode == 0 and "with its credential" in added.stdout
        wait_for(lambda: fleet.node(agent.address)["state"] == "ready", 20, "node ready with its credential")
        # The agent's refusal log shows the controller never tried it before it had the credential.
        assert "refused" not in agent.log()
