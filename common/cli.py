"""What both command-line programs share: error presentation and the `build` command."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from llamafleet.common.errors import LlamafleetError
from llamafleet.common.llamacpp.build import BuildEvent, BuildOptions, run_build
from llamafleet.common.settings import flag_name, parse_bool, parse_float, parse_int, parse_list, parse_path
from llamafleet.common.units import parse_duration, parse_size


def report_error(exc: LlamafleetError) -> None:
    click.echo(f"error: {exc.message}", err=True)
    if exc.detail:
        click.echo("\n".join("  " + line for line in exc.detail.splitlines()), err=True)


def run_main(group: click.Group, argv: list[str] | None = None) -> None:
    """Run a click program; a LlamafleetError becomes one line and its exit code, not a traceback."""
    try:
        code = group.main(args=argv, standalone_mode=False)
        # Without standalone mode click returns a raised Exit's code instead of exiting.
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except LlamafleetError as exc:
        report_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


class ProgressPrinter:
    """Build progress: a redrawn line on a terminal, sparse plain lines in a log."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_step = ""
        self.last_percent = -10
        self.started = time.monotonic()

    def __call__(self, event: BuildEvent) -> None:
        elapsed = time.monotonic() - self.started
        if event.total:
            percent = 100 * event.done // event.total
            if self.tty:
                bar = "#" * (percent // 4)
                self.stream.write(f"\r[{event.step}] {bar:<25} {percent:3d}% ({event.done}/{event.total}) {elapsed:4.0f}s")
                self.stream.flush()
                return
            if percent < self.last_percent + 10 and event.done != event.total:
                return
            self.last_percent = percent
            self.stream.write(f"[{event.step}] {percent}% ({event.done}/{event.total}) after {elapsed:.0f}s\n")
            return
        if self.tty and self.last_step == "compile":
            self.stream.write("\n")
        self.last_step = event.step
        self.stream.write(f"[{event.step}] {event.message}\n")
        self.stream.flush()


def build_command(default_state_dir: Callable[[], Path]) -> click.Command:
    """`build`, shared by llamafleet-agent (workers) and llamafleet (the coordinator host)."""

    @click.command("build")
    @click.option("--source", required=True, help="GIT_URL[@REF], a source DIR, or TARBALL[:SUBDIR].")
    @click.option("--cuda/--no-cuda", default=None, help="Force CUDA on or off (default: on when nvcc and an NVIDIA driver are present).")
    @click.option("--cuda-architectures", default=None, help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 or '86;89' (default: the GPUs present).")
    @click.option("--jobs", type=click.IntRange(min=0), default=0, help="Parallel compile jobs (0: one per CPU).")
    @click.option("--patches/--no-patches", default=True, show_default=True,
                  help="Apply llamafleet's llama.cpp patches (patches/llama.cpp); --no-patches builds stock llama.cpp.")
    @click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None, help="Where builds are kept (env LLAMAFLEET_STATE_DIR).", envvar="LLAMAFLEET_STATE_DIR")
    def build(source: str, cuda: bool | None, cuda_architectures: str | None, jobs: int, patches: bool,
              state_dir: Path | None) -> None:
        """Build llama.cpp's ggml-rpc-server and llama-server; print the install directory last."""
        options = BuildOptions(
            source=source,
            state_dir=state_dir or default_state_dir(),
            cuda=cuda,
            cuda_architectures=cuda_architectures,
            jobs=jobs,
            patches=None if patches else (),
        )
        outcome = run_build(options, ProgressPrinter())
        manifest = outcome.manifest
        click.echo(
            f"{'already built' if outcome.cached else 'built'}: {manifest.source_id} "
            f"(RPC protocol {manifest.rpc_protocol_version}, backends {', '.join(manifest.backends)}, "
            f"patches: {', '.join(manifest.patch_names) or 'none'})",
            err=True,
        )
        click.echo(str(manifest.install_dir))

    return build


def setup_logging(level: str) -> None:
    """Plain lines on stderr; under systemd the journal adds time and unit."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


F = TypeVar("F", bound=Callable[..., Any])
_METAVARS = {parse_int: "N", parse_float: "NUMBER", parse_path: "PATH", parse_size: "SIZE", parse_list: "LIST",
             parse_duration: "DURATION"}


def settings_options(settings_class: type) -> Callable[[F], F]:
    """One click option per settings field: the field's flag, help and shape (bool, repeatable).

    Every option defaults to None, so a flag the operator did not type never beats the
    environment or the config file; the settings parser converts and checks the text.
    """

    def decorate(command: F) -> F:
        for field in reversed(dataclasses.fields(settings_class)):
            flag = flag_name(field)
            help_text = field.metadata.get("help", "")
            if field.default not in (None, (), False, ""):
                help_text += f" [default: {field.default}]"
            metavar = _METAVARS.get(field.metadata["parse"], "TEXT")
            if field.metadata["parse"] is parse_bool:
                option = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=None, help=help_text)
            elif field.metadata.get("repeat"):
                option = click.option(flag, field.name, multiple=True, help=help_text + " (repeatable)")
            else:
                option = click.option(flag, field.name, default=None, metavar=metavar, help=help_text)
            command = option(command)
        return command

    return decorate


def settings_flags(settings_class: type, params: dict[str, Any]) -> dict[str, Any]:
    """The settings fields among a command's parameters."""
    return {f.name: params[f.name] for f in dataclasses.fields(settings_class) if f.name in params}
