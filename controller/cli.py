"""`llamafleet`: the controller daemon and the operator's command line."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import click
from llamafleet.common.cache_summary import summary_line
from llamafleet.common.cli import (
    build_command,
    run_main,
    settings_flags,
    settings_options,
    setup_logging,
)
from llamafleet.common.model_names import check_name
from llamafleet.common.settings import split_host_port
from llamafleet.common.agent_client import read_token_file
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.paths import default_state_dir
from llamafleet.common.settings import load_settings
from llamafleet.common.units import format_size, parse_duration
from llamafleet.controller.client import (
    ControllerError,
    call,
    stream_json_lines,
    stream_sse,
)
from llamafleet.controller.gateway.options import is_known_option
from llamafleet.controller.models import parse_model_name
from llamafleet.controller.settings import DEFAULT_LISTEN, ControllerSettings

DEFAULT_CONTROLLER = f"http://{DEFAULT_LISTEN}"
_PATH = click.Path(path_type=Path)
CONTROLLER_OPTION = click.option(
    "--controller", default=lambda: os.environ.get("LLAMAFLEET_CONTROLLER", DEFAULT_CONTROLLER),
    show_default=DEFAULT_CONTROLLER, help="Controller URL (env LLAMAFLEET_CONTROLLER).")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


@click.group()
@click.version_option(package_name="llamafleet")
def cli() -> None:
    """The llamafleet controller: places models on workers and serves the Ollama API.

    Commands send $LLAMAFLEET_ADMIN_KEY to the control routes and $LLAMAFLEET_API_KEY (or, without
    one, the admin key) to the Ollama API.
    """


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
    # `kill -USR1` prints where every thread is: the first thing to ask of a controller that hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
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
    click.echo("\n".join(render_nodes(docs)))


def render_nodes(docs: list[dict[str, Any]]) -> list[str]:
    """The `llamafleet nodes` table, from `nodes --json`'s documents."""
    lines: list[str] = []
    echo = lines.append
    if not docs:
        echo("no nodes: add one with `llamafleet node add HOST:PORT`")
    for doc in docs:
        rpc, build = doc.get("rpc_server") or {}, doc.get("build") or {}
        line = f"{doc['address']:<22} {doc['state']:<12}"
        if rpc:
            line += (f" rpc-server {rpc['state']} {rpc['endpoint']} (protocol {rpc['protocol_version'] or '?'}),"
                     f" llama.cpp {(build.get('commit') or build.get('source_id') or '?')[:19]}")
        if rpc.get("model"):
            line += f", serving {rpc['model']}"
        if doc.get("error"):
            # A ready node's error is what the controller clamped or refused of its status.
            line += f"  [{doc['error']}]"
        echo(line)
        if rpc and rpc["state"] != "running" and rpc.get("last_exit"):
            # Why it is down, in the agent's words: a crash, or a GPU that is not the one pinned.
            echo(f"{'':<24}rpc-server {rpc['state']}: {rpc['last_exit']}")
        for other in (doc.get("rpc_servers") or [])[1:]:
            if other["state"] != "stopped" or other.get("model"):
                serving = f", serving {other['model']}" if other.get("model") else ""
                why = f": {other['last_exit']}" if other["state"] != "running" and other.get("last_exit") else ""
                echo(f"{'':<24}rpc-server #{other['index']} {other['state']} {other['endpoint']}{serving}{why}")
        for device in doc.get("devices") or []:
            gpu = f" {device['uuid']}" if device.get("uuid") else ""
            echo(f"{'':<24}{device['name']}{gpu}: {format_size(device['free_bytes'])} free of "
                 f"{format_size(device['total_bytes'])}")
        for share in doc.get("gpu_shares") or []:
            # What placement counts of a GPU other agents advertise too (controller/gpu_shares.py).
            echo(f"{'':<24}{share['uuid']} is also advertised by {', '.join(share['shared_with'])}: "
                 f"{share['how']}; placement counts {format_size(share['total_bytes'])} of its "
                 f"{format_size(share['physical_total_bytes'])} here ({format_size(share['free_bytes'])} free)")
        if doc.get("rpc_layout") == "per-device":
            echo(f"{'':<24}rpc layout per-device: one rpc-server per GPU per model slot")
        for model in doc.get("models") or []:
            digest = f"sha256 {model['sha256'][:12]}" if model["state"] == "ready" else model["state"]
            if model.get("error"):
                digest += f": {model['error']}"
            echo(f"{'':<24}model {model['name']} ({format_size(int(model['size_bytes']))}, {digest})")
        if doc.get("models_omitted"):
            echo(f"{'':<24}{doc['models_omitted']} more file(s) in {doc['models_dir']} not indexed "
                 "(over 1,000 files, or a name over 255 characters)")
        if (cache := doc.get("rpc_cache")) and cache["cache_dir"]:
            echo(f"{'':<24}rpc cache {summary_line(cache)}")
        for part in doc.get("pulling") or []:
            echo(f"{'':<24}pulling {part['model']} as {part['name']}: {_share(part)}")
    return lines


def _share(part: dict[str, Any]) -> str:
    """`40% (101.2 MiB of 253.0 MiB)`"""
    percent = 100 * part["completed"] // part["total"] if part["total"] else 100
    return f"{percent}% ({format_size(part['completed'])} of {format_size(part['total'])})"


@cli.command()
@CONTROLLER_OPTION
@JSON_OPTION
def models(controller: str, as_json: bool) -> None:
    """List the models the controller serves and the nodes that hold each one."""
    docs = call(controller, "GET", "/llamafleet/v1/models")
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    if not docs:
        click.echo("no models: put GGUF files in --models-dir, or name them with --model NAME=PATH")
        return
    click.echo(f"{'MODEL':<28} {'SIZE':>10}  {'SHA256':<12}  HOLDERS")
    for doc in docs:
        if doc.get("error"):
            click.echo(f"{doc['model']:<28} {'?':>10}  {'':<12}  {doc['error']}")
            continue
        holders = ", ".join(doc["holders"]) or "-"
        click.echo(f"{doc['model']:<28} {format_size(doc['size_bytes']):>10}  {(doc['sha256'] or '-')[:12]:<12}  "
                   f"{holders}")
        if not doc["holders"] and "computing" in doc.get("holder_note", ""):
            click.echo(f"{'':<29}{doc['holder_note']}")
        for part in doc.get("pulling") or []:
            click.echo(f"{'':<29}pulling into {part['node']}: {_share(part)}")


class PullProgress:
    """A pull's progress on stderr: one redrawn line on a terminal, a line per node and 10% in a log."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.shown: dict[str, tuple[str, int]] = {}
        self.drawn = False

    def __call__(self, doc: dict[str, Any]) -> None:
        if doc.get("status") == "hashing":
            click.echo(f"computing the sha256 of {doc['model']} ({format_size(doc['total'])})…", err=True)
            return
        node = doc.get("node")
        if not node:
            return
        self.nodes[node] = doc
        if self.tty:
            line = "  ".join(f"{n} {_state_of(d)}" for n, d in self.nodes.items())
            click.echo(f"\r{line[:160]:<160}", err=True, nl=False)
            self.drawn = True
            return
        tenth = 10 * doc["completed"] // doc["total"] if doc["total"] else 10
        if self.shown.get(node) != (doc["status"], tenth):
            self.shown[node] = (doc["status"], tenth)
            click.echo(f"{node}: {_state_of(doc)}", err=True)

    def end(self) -> None:
        if self.drawn:
            click.echo("", err=True)


def _state_of(doc: dict[str, Any]) -> str:
    if doc["status"] == "pulling":
        resumed = f", resumed at {format_size(doc['resumed_from'])}" if doc.get("resumed_from") else ""
        return f"pulling {_share(doc)}{resumed}"
    return doc["status"]


@cli.command()
@click.argument("model")
@click.option("--node", "nodes", multiple=True, metavar="ADDR",
              help="A node to pull into (repeatable). Default: every reachable node with a models dir that "
                   "does not hold the model yet.")
@click.option("--as", "name", metavar="NAME",
              help="Its name in the nodes' models dirs, NAME or FOLDER/NAME (default: from MODEL, "
                   "gemma3:270m → gemma3/270m).")
@CONTROLLER_OPTION
@JSON_OPTION
def pull(model: str, nodes: tuple[str, ...], name: str | None, controller: str, as_json: bool) -> None:
    """Copy MODEL's GGUF file from the controller into nodes' models dirs.

    Resumable (pull again after an interruption: only the missing bytes are sent), verified by
    sha256 on the node before it is used. Progress on stderr; a line per node on stdout (--json:
    the outcome). Exit 0 when every node holds the model (or none needed it), 1 when a node
    failed or the controller refused, 2 on invalid arguments.
    """
    try:
        parse_model_name(model)
    except LlamafleetError as exc:
        raise click.BadParameter(exc.message, param_hint="MODEL") from None
    if name is not None:
        try:
            check_name(name)
        except LlamafleetError as exc:
            raise click.BadParameter(exc.message, param_hint="--as") from None
    for address in nodes:
        try:
            split_host_port(address)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--node") from None
    body: dict[str, Any] = {"model": model, "nodes": list(nodes)} | ({"name": name} if name else {})
    progress = PullProgress()
    outcome: dict[str, Any] | None = None
    try:
        for doc in stream_json_lines(controller, "/llamafleet/v1/pull", body):
            if "nodes" in doc:
                outcome = doc
            elif "error" in doc and "status" not in doc:
                raise ControllerError(str(doc["error"]))
            else:
                progress(doc)
    finally:
        progress.end()
    if outcome is None:
        raise ControllerError("the controller ended the pull without saying how it went")
    if as_json:
        click.echo(json.dumps(outcome, indent=2))
    else:
        _print_outcome(outcome)
    if outcome["status"] != "success":
        raise ControllerError(outcome.get("error") or "the pull failed")


def _print_outcome(outcome: dict[str, Any]) -> None:
    if outcome.get("message"):
        click.echo(outcome["message"])
    for part in outcome["nodes"]:
        node, model, name = part["node"], outcome["model"], part["name"]
        if part["status"] == "held":
            click.echo(f"{node}: holds {model} already (as {name})")
        elif part["status"] == "done":
            resumed = f", resumed at {format_size(part['resumed_from'])}" if part["resumed_from"] else ""
            click.echo(f"{node}: pulled {model} as {name} ({format_size(part['sent_bytes'])} sent{resumed} in "
                       f"{part['seconds']:.1f}s, sha256 verified)")


@cli.group()
def node() -> None:
    """Add, remove or drain a node."""


@node.command("add")
@click.argument("address")
@click.option("--credential-file", type=_PATH,
              help="The agent's node credential (its STATE/token, or the file installed on it).")
@CONTROLLER_OPTION
def node_add(address: str, credential_file: Path | None, controller: str) -> None:
    """Add the agent at ADDRESS (HOST:PORT).

    Without --credential-file the controller sends it nothing (no credential of its own to
    prove) and it stays unreachable, unless the agent joins or the deprecated shared token is set.
    """
    body: dict[str, Any] = {"address": address}
    if credential_file is not None:
        body["credential"] = read_token_file(credential_file)
    reply = call(controller, "POST", "/llamafleet/v1/nodes", body)
    done = f"added {address}" if reply["added"] else f"{address} was already a node"
    click.echo(done + (" with its credential" if credential_file is not None else ""))


@node.command("remove")
@click.argument("address")
@CONTROLLER_OPTION
def node_remove(address: str, controller: str) -> None:
    """Forget the agent at ADDRESS, and revoke its credential there."""
    reply = call(controller, "DELETE", f"/llamafleet/v1/nodes/{urllib.parse.quote(address, safe='')}")
    click.echo(f"removed {address}" + ("; its credential is revoked at the agent" if reply.get("revoked") else ""))
    if not reply.get("revoked") and reply.get("not_revoked_because"):
        click.echo(f"warning: the agent was not told: {reply['not_revoked_because']}", err=True)


@node.command("rotate")
@click.argument("address")
@CONTROLLER_OPTION
def node_rotate(address: str, controller: str) -> None:
    """Give the node at ADDRESS a new credential; the old one stops working."""
    reply = call(controller, "POST", f"/llamafleet/v1/nodes/{urllib.parse.quote(address, safe='')}/rotate")
    state = "confirmed by the agent" if reply["confirmed"] else "the agent completes it at its next call"
    click.echo(f"{address}: new credential {reply['credential_fingerprint']} ({state})")


@cli.group()
def token() -> None:
    """Join tokens, with which agents join the fleet (`llamafleet-agent serve --join`)."""


@token.command("create")
@click.option("--ttl", default="1h", show_default=True, help="How long the token stays good (e.g. 30m, 1h).")
@click.option("--uses", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="How many agents may join with it.")
@CONTROLLER_OPTION
def token_create(ttl: str, uses: int, controller: str) -> None:
    """Print a new join token (only its hash is stored)."""
    reply = call(controller, "POST", "/llamafleet/v1/tokens", {"ttl_s": parse_duration(ttl), "uses": uses})
    click.echo(reply["token"])
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(reply["expires_at_unix_ms"] / 1000))
    click.echo(f"good for {uses} join(s) until {expires}", err=True)


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
             f"context {e['ctx']} × {e['parallel']} slot(s), KV cache {e['cache_type']} "
             f"({format_size(e.get('kv_bytes_per_slot', 0))} per slot)"]
    for part, size in e["parts"].items():
        lines.append(f"  {part.replace('_', ' '):<24} {format_size(size):>10}")
    lines.append(f"  {'on the workers':<24} {format_size(e['device_total_bytes']):>10}")
    if doc["fits"]:
        here = doc.get("coordinator") or "controller"
        local = [a for a in doc["assignments"] if a["node"] == here]
        split = doc["tensor_split"][len(local):]
        nodes = len({a["node"] for a in doc["assignments"]})
        if local and not doc["backends"]:
            lines.append(f"fits on {here} alone: its coordinator computes every layer (no rpc-server)")
        elif local:
            lines.append(f"fits on {nodes} node(s), {here} computing {sum(doc['tensor_split'][:len(local)])} "
                         f"layer(s) in the coordinator: --rpc {','.join(doc['backends'])} "
                         f"--tensor-split {','.join(map(str, split))}")
        else:
            lines.append(f"fits on {len(doc['backends'])} backend(s): --rpc {','.join(doc['backends'])} "
                         f"--tensor-split {','.join(map(str, split))}")
        for a in doc["assignments"]:
            last = a["first_layer"] + a["layer_count"] - 1
            layers = ("no layers" if not a["layer_count"] else f"layer {last}" if a["layer_count"] == 1
                      else f"layers {a['first_layer']}-{last}")
            extra = " + output" if a["output_bytes"] else ""
            held = ", holds the model" if a["node"] in doc.get("holders", []) else ""
            gpu = f" ({a['uuid']})" if a.get("uuid") else ""
            via = "in the coordinator" if a["node"] == here else f"via {a['endpoint']}"
            lines.append(f"  node {a['node']} device {a['device']}{gpu} {via}: {layers}{extra}: "
                         f"{format_size(a['total_bytes'])} of {format_size(a['usable_bytes'])} usable{held}")
    else:
        lines.append(f"does not fit: {doc['reason']}")
    spare = [a for a, why in doc["excluded"].items() if why.startswith("not needed")]
    for address, why in sorted(doc["excluded"].items()):
        if address not in spare:
            lines.append(f"  excluded {address}: {why}")
    if spare:
        lines.append(f"  {len(spare)} more ready node(s) not needed: fewer backends hold the model")
    if doc.get("holder_reason"):
        lines.append(f"holders: {doc['holder_reason']}")
    if doc.get("fits") and doc.get("coordinator_reason"):
        lines.append(f"coordinator: {doc['coordinator_reason']}")
    if route := doc.get("route"):
        lines.append(f"route: {route['target']}: {route['reason']}")
    for warning in doc["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


@cli.command()
@CONTROLLER_OPTION
@JSON_OPTION
def ps(controller: str, as_json: bool) -> None:
    """List the loaded models: state, backends, memory, until when."""
    docs = call(controller, "GET", "/llamafleet/v1/ps")
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    if not docs:
        click.echo("no models loaded")
        return
    click.echo(f"{'MODEL':<28} {'STATE':<9} {'SIZE':>10} {'UNTIL':<12} {'COORDINATOR':<22} BACKENDS")
    for doc in docs:
        until = "forever" if doc["expires_at_unix"] is None and doc["state"] == "ready" else ""
        if doc["expires_at_unix"] is not None:
            until = f"{max(doc['expires_at_unix'] - time.time(), 0):.0f}s idle" if doc["in_flight"] == 0 else "in use"
        click.echo(f"{doc['model']:<28} {doc['state']:<9} {format_size(doc['size_bytes']):>10} {until:<12} "
                   f"{doc.get('coordinator') or '-':<22} {','.join(doc['backends']) or '-'}"
                   + (f"  ({doc['parallel']} slot{'s' if doc['parallel'] != 1 else ''}, {doc.get('queued', 0)} queued)"
                      if doc.get("parallel") else ""))
        if doc["state"] != "ready" and doc["detail"]:
            click.echo(f"{'':<29}{doc['detail']}")
        if doc.get("log_error"):
            click.echo(f"{'':<29}log: {doc['log_error']} ({doc.get('log_lines_lost', 0)} line(s) not kept)")


@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they happen.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="How many past events.")
@CONTROLLER_OPTION
@JSON_OPTION
def events(follow: bool, limit: int, controller: str, as_json: bool) -> None:
    """The fleet's event log: nodes up and down, restarts and their causes, placements, unloads.

    With --json: one JSON list; with --follow --json, one JSON object per line.
    """
    past = call(controller, "GET", f"/llamafleet/v1/events?limit={limit}")
    if as_json and not follow:
        click.echo(json.dumps(past, indent=2))
        return
    for event in past:
        _print_event(event, as_json)
    if not follow:
        return
    after = past[-1]["id"] if past else 0
    for event in stream_sse(controller, f"/llamafleet/v1/events/stream?after={after}"):
        _print_event(event, as_json)


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(event))
    else:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at_ms"] / 1000))
        click.echo(f"{at}  {event['kind']:<22} {event['subject']}: {event['message']}")
    sys.stdout.flush()


@cli.command()
@CONTROLLER_OPTION
@JSON_OPTION
def pool(controller: str, as_json: bool) -> None:
    """List the Ollama pool nodes: health, load, models."""
    docs = call(controller, "GET", "/llamafleet/v1/pool")
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    if not docs:
        click.echo("no Ollama pool nodes (add them with --ollama-node URL)")
    for doc in docs:
        state = "healthy" if doc["healthy"] else f"down: {doc['error']}"
        click.echo(f"{doc['url']:<32} {state:<12} in flight {doc['in_flight']}, {len(doc['models'])} model(s)")


@cli.command()
@click.argument("model")
@CONTROLLER_OPTION
def stop(model: str, controller: str) -> None:
    """Unload MODEL now (its coordinator stops; requests in flight end)."""
    reply = call(controller, "POST", "/llamafleet/v1/stop", {"model": model})
    click.echo(f"stopped {reply['model']}")


@cli.command()
@click.argument("model")
@click.argument("prompt", required=False)
@click.option("--keep-alive", help="How long the model stays loaded after this (\"5m\", seconds, -1: forever).")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="An Ollama option for the answers, e.g. -o num_predict=64 -o temperature=0 (repeatable).")
@CONTROLLER_OPTION
def run(model: str, prompt: str | None, keep_alive: str | None, options: tuple[str, ...], controller: str) -> None:
    """Load MODEL and answer PROMPT (streamed), or chat interactively without one."""
    extra: dict[str, Any] = {}
    if keep_alive:
        try:
            parse_duration(keep_alive)
        except LlamafleetError as exc:
            raise click.BadParameter(exc.message, param_hint="--keep-alive") from None
        extra["keep_alive"] = keep_alive
    if options:
        extra["options"] = parse_options(options)
    _load_with_progress(controller, model, extra)
    if prompt is not None:
        _answer(controller, model, [{"role": "user", "content": prompt}], extra)
        return
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break
        line = line.strip()
        if line in ("/bye", "/exit"):
            break
        if not line:
            continue
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": _answer(controller, model, history, extra)})


def parse_options(entries: tuple[str, ...]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; a value is read as JSON (numbers, lists) when it is JSON, else as text."""
    out: dict[str, Any] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, not {entry!r}", param_hint="--option")
        if not is_known_option(key):
            # The gateway drops what it does not know, as Ollama does; an operator's typo is better said.
            raise click.BadParameter(f"unknown option '{key}'", param_hint="--option")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            # Not JSON: the text itself (a stop word, say).
            out[key] = value
    return out


def _load_with_progress(controller: str, model: str, extra: dict[str, Any]) -> None:
    """Ask for the model and show its coordinator's state until it is ready (stderr)."""
    outcome: dict[str, Any] = {}

    def load() -> None:
        try:
            load = {"model": model, "prompt": ""} | {k: v for k, v in extra.items() if k != "keep_alive"}
            outcome["reply"] = call(controller, "POST", "/api/generate", load, timeout=None)
        except LlamafleetError as exc:
            # Handed to the main thread, which reports it like any other error.
            outcome["error"] = exc

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    started, shown, tty = time.monotonic(), "", sys.stderr.isatty()
    while worker.is_alive():
        worker.join(0.5)
        if not worker.is_alive():
            break
        try:
            docs = call(controller, "GET", "/llamafleet/v1/ps", timeout=5)
        except ControllerError:
            continue  # the load request itself will report a dead controller
        doc = _entry_of(docs, model)
        if doc is None or doc["state"] == "ready":
            continue
        line = f"loading {doc['model']}: {doc['detail'] or doc['state']} ({time.monotonic() - started:.0f}s)"
        if tty:
            click.echo(f"\r{line[:120]:<120}", err=True, nl=False)
        elif line.split(" (")[0] != shown:
            click.echo(line, err=True)
        shown = line.split(" (")[0]
    if tty and shown:
        click.echo("", err=True)
    if "error" in outcome:
        raise outcome["error"]
    load_s = outcome["reply"].get("load_duration", 0) / 1e9
    if load_s > 0.05:
        try:
            placed = _entry_of(call(controller, "GET", "/llamafleet/v1/ps"), model)
        except ControllerError:
            placed = None  # `ps` is a control route: a user with only an API key is not told where
        where = f" on {len(placed['backends'])} backend(s): {', '.join(placed['backends'])}" if placed else ""
        click.echo(f"loaded {model} in {load_s:.1f}s{where}", err=True)


def _entry_of(docs: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    """The `ps` entry of `model`, however the user spelled its name."""
    try:
        key = parse_model_name(model).short
    except LlamafleetError:
        return None  # not a valid name: the load request reports that
    return next((d for d in docs if d["model"] == key), None)


def _answer(controller: str, model: str, messages: list[dict[str, str]], extra: dict[str, Any]) -> str:
    """Stream one chat answer to stdout; a stats line to stderr. Returns the text."""
    text = []
    final: dict[str, Any] = {}
    for doc in stream_json_lines(controller, "/api/chat", {"model": model, "messages": messages} | extra):
        if "error" in doc:
            click.echo("", err=True)
            raise ControllerError(str(doc["error"]))
        piece = (doc.get("message") or {}).get("content", "")
        text.append(piece)
        click.echo(piece, nl=False)
        sys.stdout.flush()
        if doc.get("done"):
            final = doc
    click.echo("")
    if final.get("eval_duration"):
        rate = final["eval_count"] / (final["eval_duration"] / 1e9)
        click.echo(f"[{final['eval_count']} tokens, {rate:.1f} tokens/s, {final.get('done_reason', '')}]", err=True)
    return "".join(text)


def main() -> None:
    run_main(cli)
