"""`llamafleet-agent`: the worker daemon and its local commands."""

from __future__ import annotations

import click

from llamafleet.common.cli import build_command, run_main
from llamafleet.common.paths import default_state_dir


@click.group()
@click.version_option(package_name="llamafleet")
def cli() -> None:
    """The llamafleet worker agent: builds llama.cpp and supervises its ggml-rpc-server."""


cli.add_command(build_command(lambda: default_state_dir("agent")))


def main() -> None:
    run_main(cli)
