"""`llamafleet`: the controller daemon and the operator's command line."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click

from llamafleet.common.cli import build_command, run_main, settings_flags, settings_options, setup_logging
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.paths import default_state_dir
from llamafleet.common.settings import load_settings
from llamafleet.common.units import format_size
from llamafleet.controller.settings import DEFAULT_LISTEN, ControllerSettings

DEFAULT_CONTROLLER = f"http://{DEFAULT_LISTEN}"
_PATH = click.Path(path_type=Path)
CONTROLLER_OPTION = click.option(
    "--controller", default=lambda: os.environ.get("LLAMAFLEET_CONTROLLER", DEFAULT_CONTROLLER),
    show_default=DEFAULT_CONTROLLER, help="Controller URL (env LLAMAFLEET_CONTROLLER).")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


class ControllerError(LlamafleetError):
    """The controller could not be reached or answered with an error."""


def call(controller: str, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    url = controller.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (json.JSONDecodeError, AttributeError):
            # Not our JSON error shape: fall back to the HTTP reason.
            message = exc.reason
        raise ControllerError(str(message)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ControllerError(f"controller at {controller} is unreachable: {reason}") from None


@click.group()
@click.version_option(package_name="llamafleet")
def cli() -> None:
    """The llamafleet controller: places models on workers and serves the Ollama API."""


cli.add_command(build_command(lambda: default_state_dir("controller")))

@cli.command()
@click.option("--config", "config_file", type=_PATH, envvar="LLAMAFLEET_CONFIG", help="TOML config file.")
@settings_options(ControllerSettings)
@click.option("--log-level", default="info", show_default=True, envvar="LLAMAFLEET_LOG_LEVEL")
@click.pass_context
def serve(ctx: click.Context, config_file: Path | None, log_level: str, **_: Any) -> None:
    """Run the controller: node inventory, placement, HTTP API."""
    from llamafleet.controller.daemon import serve as run_daemon

    settings = load_settings(ControllerSettings, flags=settings_flags(ControllerSettings, ctx.params),
                             config_file=config_file)
    setup_logging(log_level)
    asyncio.run(run_daemon(settings))


@cli.command()
@CONTROLLER_OPTION
@JSON_OPTION
def nodes(controller: str, as_json: bool) -> None:
    """List the nodes: state, llama.cpp, rpc-server, memory."""
    docs = call(controller, "GET", "/llamafleet/v1/nodes")
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    if not docs:
        click.echo("no nodes: add one with `llamafleet node add HOST:PORT`")
    for doc in docs:
        rpc, build = doc.get("rpc_server") or {}, doc.get("build") or {}
        line = f"{doc['address']:<22} {doc['state']:<12}"
        if rpc:
            line += (f" rpc-server {rpc['state']} {rpc['endpoint']} (protocol {rpc['protocol_version'] or '?'}),"
                     f" llama.cpp {(build.get('commit') or build.get('source_id') or '?')[:19]}")
        if doc.get("error") and doc["state"] != "ready":
            line += f"  [{doc['error']}]"
        click.echo(line)
        for device in doc.get("devices") or []:
            click.echo(f"{'':<24}{device['name']}: {format_size(device['free_bytes'])} free of "
                       f"{format_size(device['total_bytes'])}")


@cli.group()
def node() -> None:
    """Add, remove or drain a node."""


@node.command("add")
@click.argument("address")
@CONTROLLER_OPTION
def node_add(address: str, controller: str) -> None:
    """Add the agent at ADDRESS (HOST:PORT)."""
    reply = call(controller, "POST", "/llamafleet/v1/nodes", {"address": address})
    click.echo(f"added {address}" if reply["added"] else f"{address} was already a node")


@node.command("remove")
@click.argument("address")
@CONTROLLER_OPTION
def node_remove(address: str, controller: str) -> None:
    """Forget the agent at ADDRESS."""
    call(controller, "DELETE", f"/llamafleet/v1/nodes/{urllib.parse.quote(address, safe='')}")
    click.echo(f"removed {address}")


@node.command("maintenance")
@click.argument("address")
@click.option("--on/--off", "enabled", default=True, help="Drain (on) or return to service (off).")
@CONTROLLER_OPTION
def node_maintenance(address: str, enabled: bool, controller: str) -> None:
    """Drain a node (no new placements) or return it to service."""
    call(controller, "POST", f"/llamafleet/v1/nodes/{urllib.parse.quote(address, safe='')}/maintenance",
         {"enabled": enabled})
    click.echo(f"{address}: maintenance {'on' if enabled else 'off'}")


@cli.command()
@click.argument("model")
@click.option("--ctx", type=int, help="Context per request (default: the controller's).")
@CONTROLLER_OPTION
@JSON_OPTION
def plan(model: str, ctx: int | None, controller: str, as_json: bool) -> None:
    """Show where MODEL would go: the estimate, the backends, the split, and why."""
    body: dict[str, Any] = {"model": model}
    if ctx is not None:
        body["ctx"] = ctx
    doc = call(controller, "POST", "/llamafleet/v1/plan", body)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(render_plan(doc))
    if not doc["fits"]:
        raise click.exceptions.Exit(3)


def render_plan(doc: dict[str, Any]) -> str:
    e = doc["estimate"]
    lines = [f"model {doc['model']} ({e['architecture']}, {e['n_layers']} layers) from {doc['path']}",
             f"context {e['ctx']} × {e['parallel']} slot(s), KV cache {e['cache_type']}"]
    for part, size in e["parts"].items():
        lines.append(f"  {part.replace('_', ' '):<24} {format_size(size):>10}")
    lines.append(f"  {'on the workers':<24} {format_size(e['device_total_bytes']):>10}")
    if doc["fits"]:
        lines.append(f"fits on {len(doc['backends'])} backend(s): --rpc {','.join(doc['backends'])} "
                     f"--tensor-split {','.join(map(str, doc['tensor_split']))}")
        for a in doc["assignments"]:
            last = a["first_layer"] + a["layer_count"] - 1
            layers = ("no layers" if not a["layer_count"] else f"layer {last}" if a["layer_count"] == 1
                      else f"layers {a['first_layer']}-{last}")
            extra = " + output" if a["output_bytes"] else ""
            lines.append(f"  {a['endpoint']:<22} {a['device']:<6} {layers}{extra}: {format_size(a['total_bytes'])} "
                         f"of {format_size(a['usable_bytes'])} usable")
    else:
        lines.append(f"does not fit: {doc['reason']}")
    spare = [a for a, why in doc["excluded"].items() if why.startswith("not needed")]
    for address, why in sorted(doc["excluded"].items()):
        if address not in spare:
            lines.append(f"  excluded {address}: {why}")
    if spare:
        lines.append(f"  {len(spare)} more ready node(s) not needed: fewer backends hold the model")
    for warning in doc["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def main() -> None:
    run_main(cli)
