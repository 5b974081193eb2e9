"""TLS and mTLS on the agent's gRPC port, with certificates made by openssl for the test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.proto.v1 import agent_pb2 as pb
from llamafleet.proto.v1 import agent_pb2_grpc as pb_grpc
from tests.integration.agent.harness import AGENT, running_agent

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _pki(d: Path, san: str = "IP:127.0.0.1") -> Path:
    """ca.crt, and server/client certificates signed by it for `san` (openssl's subjectAltName)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    return d


def test_mtls_accepts_a_client_certificate_and_refuses_a_client_without_one(tmp_path: Path, llama_cpp: Manifest) -> None:
    pki = _pki(tmp_path)
    good = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(), (pki / "client.key").read_bytes(),
                                        (pki / "client.crt").read_bytes())
    args = ("--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"),
            "--tls-client-ca", str(pki / "ca.crt"))
    with running_agent(tmp_path, llama_cpp.install_dir, extra_args=args, credentials=good) as agent:
        assert agent.status().node.node_id
        no_cert = grpc.secure_channel(agent.address, grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes()))
        with no_cert, pytest.raises(grpc.RpcError) as caught:
            pb_grpc.AgentServiceStub(no_cert).GetStatus(pb.GetStatusRequest(), metadata=agent.metadata, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(agent.address) as plain, pytest.raises(grpc.RpcError):
            pb_grpc.AgentServiceStub(plain).GetStatus(pb.GetStatusRequest(), metadata=agent.metadata, timeout=5)
        cli = subprocess.run([AGENT, "status", "--address", agent.address, "--token-file", str(agent.state_dir / "token"),
                              "--tls-ca", str(pki / "ca.crt"), "--tls-client-cert", str(pki / "client.crt"),
                              "--tls-client-key", str(pki / "client.key"), "--json"], capture_output=True, text=True,
                             timeout=30)
        assert cli.returncode == 0, cli.stderr
