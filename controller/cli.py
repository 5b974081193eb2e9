"""`llamafleet`: the controller daemon and the operator's command line."""

from __future__ import annotations

import click

from llamafleet.common.cli import build_command, run_main
from llamafleet.common.paths import default_state_dir


@click.group()
@click.version_option(package_name="llamafleet")
def cli() -> None:
    """The llamafleet controller: places models on workers and serves the Ollama API."""


cli.add_command(build_command(lambda: default_state_dir("controller")))


def main() -> None:
    run_main(cli)
