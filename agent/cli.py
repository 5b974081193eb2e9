"""`llamafleet-agent`: the worker daemon and its local commands."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import click
import grpc

from llamafleet.agent.credential import Keyring
from llamafleet.common.fnv import Fnv1a
from llamafleet.agent.rpc_cache import RpcCache, effective_cap, process_alive
from llamafleet.common.cache_summary import summary_line
from llamafleet.agent.settings import AgentSettings, parse_cache_max
from llamafleet.common.agent_client import AgentAddress, describe_rpc_error, read_token_file, sync_stub
from llamafleet.common.cli import build_command, run_main, settings_flags, settings_options, setup_logging
from llamafleet.common.errors import LlamafleetError, UsageError
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


@cli.group()
def cache() -> None:
    """The rpc-servers' tensor cache on this worker (local: no agent call).

    Both read the agent's settings (--config, LLAMAFLEET_*) for the state and cache dirs, and
    honour what the agent records there: a model whose rpc-server still runs the process it was
    staged for is in use, and never evicted."""


_DIR_OPTIONS = (
    click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
                 help="The agent's state dir (default: the configured one)."),
    click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False),
                 help="The agent's cache dir, whose rpc/ folder the rpc-servers use (default: the configured one)."),
)


def _dir_options(command: Any) -> Any:
    for option in reversed(_DIR_OPTIONS):
        command = option(command)
    return CONFIG_OPTION(command)


def _local_cache(config_file: Path | None, state_dir: Path | None, cache_dir: Path | None,
                 on_wait: Any = lambda: None) -> tuple[AgentSettings, RpcCache]:
    flags = {"state_dir": state_dir, "cache_dir": cache_dir}
    settings = load_settings(AgentSettings, flags=flags, config_file=config_file)
    return settings, RpcCache(settings.cache_path / "rpc", settings.state_path, on_wait=on_wait)


def _cap(setting: int | None, cache: RpcCache) -> int:
    try:
        return effective_cap(setting, cache.cache_dir)
    except OSError as exc:
        raise _os_error(f"read the size of the filesystem of {cache.cache_dir}", exc) from None


def _os_error(doing: str, exc: OSError) -> LlamafleetError:
    where = f" ({exc.filename})" if exc.filename else ""
    return LlamafleetError(f"cannot {doing}: {exc.strerror or exc}{where}")


def _when(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix_ms / 1000)) if unix_ms else "-"


@cache.command("ls")
@_dir_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def cache_ls(config_file: Path | None, state_dir: Path | None, cache_dir: Path | None, as_json: bool) -> None:
    """List the cache's entries by model: size, last used, in use, verified."""
    settings, rpc_cache = _local_cache(config_file, state_dir, cache_dir)
    try:
        doc = rpc_cache.listing(_cap(settings.rpc_cache_max, rpc_cache), process_alive)
    except OSError as exc:
        raise _os_error(f"read the rpc cache {rpc_cache.cache_dir}", exc) from None
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"rpc cache {rpc_cache.cache_dir}: {summary_line(doc['summary'])}")
    rows = [(m["name"], m["sha256"][:12], str(m["entries"]) + (f" ({m['missing']} missing)" if m["missing"] else ""),
             format_size(m["size_bytes"]), _when(m["last_used_unix_ms"]),
             ",".join(f"#{i}" for i in m["rpc_server_indexes"]) if m["in_use"] else "no",
             f"{m['verified']}/{m['entries']}") for m in doc["models"]]
    network = doc["network"]
    if network["entries"]:
        rows.append(("(from the network)", "-", str(network["entries"]), format_size(network["size_bytes"]),
                     _when(network["newest_unix_ms"]), "-", f"{network['verified']}/{network['entries']}"))
    if not rows:
        return
    header = ("MODEL", "SHA256", "ENTRIES", "SIZE", "LAST USED", "IN USE", "VERIFIED")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@cache.command("gc")
@_dir_options
@click.option("--verify-all", is_flag=True, help="Hash every entry again, not only those not verified yet.")
@click.option("--max", "max_size", metavar="SIZE",
              help="Cap to enforce this time (SIZE; 0 or none: no cap; default: the configured --rpc-cache-max).")
def cache_gc(config_file: Path | None, state_dir: Path | None, cache_dir: Path | None, verify_all: bool,
             max_size: str | None) -> None:
    """Evict down to the cap, then remove entries whose content does not hash to their name.

    Exit code 1 when the cache stays over the cap (the rest is in use by running coordinators,
    or being written), 2 on a bad --max."""
    try:
        wanted = parse_cache_max(max_size) if max_size is not None else None
    except (ValueError, UsageError) as exc:
        raise UsageError(f"--max: {exc}") from None
    settings, rpc_cache = _local_cache(
        config_file, state_dir, cache_dir,
        on_wait=lambda: click.echo("waiting for the agent to finish a staging or a cache pass…", err=True))
    cap = _cap(wanted if max_size is not None else settings.rpc_cache_max, rpc_cache)
    try:
        report = rpc_cache.enforce(cap, process_alive, drop_dead_slots=False)
        for removal in report.removed:
            click.echo(f"evicted {removal.entry.name} ({format_size(removal.entry.size)}): {removal.why}")
        corrupt = rpc_cache.verify(Fnv1a(settings.state_path / "fnv1a"), threading.Event(), everything=verify_all)
        for removal in corrupt:
            click.echo(f"removed {removal.entry.name} ({format_size(removal.entry.size)}): {removal.why}")
        summary = rpc_cache.summarize(cap, process_alive)
    except OSError as exc:
        raise _os_error(f"clean the rpc cache {rpc_cache.cache_dir}", exc) from None
    freed = sum(r.entry.size for r in (*report.removed, *corrupt))
    click.echo(f"evicted {len(report.removed)}, removed {len(corrupt)} corrupt ({format_size(freed)} freed); "
               f"rpc cache now {format_size(summary.used_bytes)}" + (f" of {format_size(cap)}" if cap else " (no cap)"))
    if report.over_cap_bytes:
        raise LlamafleetError(f"still {format_size(report.over_cap_bytes)} over the cap of {format_size(cap)}: "
                              "the rest is in use by running coordinators (or being written)")


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
    if (cache := doc.get("rpc_cache")) and cache["cache_dir"]:
        lines.append(f"rpc cache   {summary_line(cache)}")
    return "\n".join(lines)


def main() -> None:
    run_main(cli)
