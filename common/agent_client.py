"""A client of the agent's gRPC service, as the CLI and the controller use it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.node_auth import make_proof
from llamafleet.proto.v1 import agent_pb2_grpc as pb_grpc


class AgentCallError(LlamafleetError):
    """The agent could not be reached or refused the call."""


@dataclass(frozen=True)
class AgentAddress:
    """Where an agent is and how to authenticate to it.

    `token` empty: no credential at all (`missing` says why), and nothing is sent. With `proof`,
    calls carry an HMAC proof of the token (a per-node secret), never the token itself.
    """

    address: str
    token: str
    tls_ca: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    proof: bool = False
    missing: str = ""

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None:
            return None
        try:
            return grpc.ssl_channel_credentials(
                root_certificates=self.tls_ca.read_bytes(),
                private_key=self.tls_client_key.read_bytes() if self.tls_client_key else None,
                certificate_chain=self.tls_client_cert.read_bytes() if self.tls_client_cert else None,
            )
        except OSError as exc:
            raise UsageError(f"cannot read TLS file: {exc}") from None

    @property
    def metadata(self) -> list[tuple[str, str]]:
        """Bearer metadata (the local CLI, the deprecated shared token)."""
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def metadata_for(self, method: str, action: str = "none", new_secret: str = "") -> list[tuple[str, str]]:
        """What to send with one call of `method` (its full gRPC path)."""
        if not self.token:
            return []
        if self.proof:
            return [("authorization", make_proof(self.token, method, action, new_secret))]
        if action != "none":
            raise UsageError(f"the agent at {self.address} has no per-node credential to {action}")
        return self.metadata


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise UsageError(f"token file {path} is empty")
    return token


def sync_stub(target: AgentAddress) -> tuple[grpc.Channel, pb_grpc.AgentServiceStub]:
    credentials = target.credentials()
    channel = (grpc.secure_channel(target.address, credentials) if credentials
               else grpc.insecure_channel(target.address))
    return channel, pb_grpc.AgentServiceStub(channel)


def aio_channel(target: AgentAddress, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to the agent, over TLS when configured (raises for unreadable TLS files)."""
    credentials = target.credentials()
    if credentials:
        return grpc.aio.secure_channel(target.address, credentials, options=options)
    return grpc.aio.insecure_channel(target.address, options=options)


def describe_rpc_error(address: str, exc: grpc.RpcError) -> AgentCallError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return AgentCallError(f"agent at {address} is unreachable: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AgentCallError(f"agent at {address} refused the token: {details}")
    name = code.name if code is not None else "ERROR"
    return AgentCallError(f"agent at {address}: {name}: {details}")
