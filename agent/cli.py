"""`llamafleet-agent`: the worker daemon and its local commands."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
import grpc

from llamafleet.agent.credential import Keyring
from llamafleet.agent.settings import AgentSettings
from llamafleet.common.agent_client import AgentAddress, describe_rpc_error, read_token_file, sync_stub
from llamafleet.common.cli import build_command, run_main, settings_flags, settings_options, setup_logging
from llamafleet.common.errors import UsageError
from llamafleet.common.paths import default_state_dir
from llamafleet.common.proto_json import message_to_json
from llamafleet.common.settings import load_settings
from llamafleet.common.units import format_size
from llamafleet.proto.v1 import agent_pb2 as pb

CONFIG_OPTION = click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                             envvar="LLAMAFLEET_CONFIG", help="TOML config file (env LLAMAFLEET_CONFIG).")


@click.group()
@click.version_option(package_name="llamafleet")
def cli() -> None:
    """The llamafleet worker agent: builds llama.cpp and supervises its ggml-rpc-server."""


cli.add_command(build_command(lambda: default_state_dir("agent")))

_PATH = click.Path(path_type=Path)


@cli.command()
@CONFIG_OPTION
@settings_options(AgentSettings)
@click.option("--log-level", default="info", show_default=True, envvar="LLAMAFLEET_LOG_LEVEL")
@click.pass_context
def serve(ctx: click.Context, config_file: Path | None, log_level: str, **_: Any) -> None:
    """Run the agent: gRPC service, rpc-server supervision, systemd notify."""
    from llamafleet.agent.daemon import serve as run_daemon

    settings = load_settings(AgentSettings, flags=settings_flags(AgentSettings, ctx.params), config_file=config_file)
    setup_logging(log_level)
    asyncio.run(run_daemon(settings))


@cli.command()
@CONFIG_OPTION
@click.option("--address", help="Agent HOST:PORT (default: the configured --listen).")
@click.option("--token-file", type=_PATH, help="Bearer token file (default: the configured one).")
@click.option("--tls-ca", type=_PATH, help="CA of the agent's TLS certificate.")
@click.option("--tls-client-cert", type=_PATH, help="Client certificate for mTLS.")
@click.option("--tls-client-key", type=_PATH, help="Client key for mTLS.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the agent.")
@click.pass_context
def status(ctx: click.Context, config_file: Path | None, address: str | None, token_file: Path | None,
           tls_ca: Path | None, tls_client_cert: Path | None, tls_client_key: Path | None,
           as_json: bool, timeout: float) -> None:
    """Show an agent's status (the local one by default)."""
    settings = load_settings(AgentSettings, flags={}, config_file=config_file)
    target = AgentAddress(
        address=address or settings.listen,
        token=read_token_file(token_file) if token_file else _local_credential(settings),
        tls_ca=tls_ca, tls_client_cert=tls_client_cert, tls_client_key=tls_client_key,
    )
    channel, stub = sync_stub(target)
    with channel:
        try:
            reply = stub.GetStatus(pb.GetStatusRequest(), metadata=target.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise describe_rpc_error(target.address, exc) from None
    document = message_to_json(reply.status)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(render_status(document))


def _local_credential(settings: AgentSettings) -> str:
    """The credential the local agent accepts (issued at a join, installed, or made at first start)."""
    keyring = Keyring(settings.state_path, settings.token_file, create=False)
    if keyring.current is None:
        raise UsageError(f"no node credential in {settings.state_path} (not joined yet, or revoked): "
                         "pass --token-file")
    return keyring.current


def render_status(doc: dict[str, Any]) -> str:
    rpc, build, node = doc["rpc_server"], doc["build"], doc["node"]
    lines = [
        f"node        {node['hostname']} ({node['node_id']}), agent {node['agent_version']}",
        f"llama.cpp   {build['commit'] or build['source_id'] or 'none'} "
        f"(RPC protocol {build['rpc_protocol_version'] or '?'}; {', '.join(build['backends']) or 'no backends'})",
        f"rpc-server  {rpc['state']} {rpc['endpoint']} pid {rpc['pid']} generation {rpc['generation']} "
        f"restarts {rpc['restarts']}",
    ]
    if rpc["last_exit"]:
        lines.append(f"last exit   {rpc['last_exit']}")
    for line in rpc["last_output"][-5:]:
        lines.append(f"            | {line}")
    for other in (doc.get("rpc_servers") or [])[1:]:
        if other["state"] != "stopped":
            lines.append(f"rpc-server  #{other.get('index', 0)} {other['state']} {other['endpoint']} pid {other['pid']} "
                         f"generation {other['generation']}")
    for device in doc["devices"]:
        lines.append(f"device      {device['name']}: {format_size(device['free_bytes'])} free of "
                     f"{format_size(device['total_bytes'])}")
    for device in rpc["devices"]:
        lines.append(f"rpc device  {device['name']} ({device['description']}): "
                     f"{format_size(device['free_bytes'])} free of {format_size(device['total_bytes'])}")
    for model in doc.get("models") or []:
        digest = model["sha256"][:12] if model["state"] == "ready" else model["state"]
        lines.append(f"model       {model['name']} ({format_size(int(model['size_bytes']))}, sha256 {digest})")
    if doc.get("models_omitted"):
        lines.append(f"models      {doc['models_omitted']} more file(s) in {doc['models_dir']} not indexed")
    return "\n".join(lines)


def main() -> None:
    run_main(cli)
