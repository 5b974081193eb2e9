"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a live fleet."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.controller.harness import running_fleet

if TYPE_CHECKING:  # imported by the fixture only once Chromium is known to be there
    from playwright.sync_api import Browser

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google, which this network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def test_dashboard_shows_nodes_placement_events_and_a_node_going_down_and_back(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path, browser: Browser) -> None:
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, agents=2) as fleet:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{fleet.url}/ui/")
        for agent in fleet.agents:
            page.locator(f'[data-node="{agent.address}"][data-state="ready"]').wait_for(timeout=15_000)
        # Run a prompt from the form: it loads the model across both workers.
        page.select_option("#prompt-model", "gemma:latest")
        page.fill("#prompt", "The capital of France is")
        page.fill("#prompt-tokens", "12")
        page.click("#prompt-run")
        page.locator("#answer-stats", has_text="tokens/s").wait_for(timeout=60_000)
        assert page.inner_text("#answer").strip()
        model = page.locator('[data-model="gemma:latest"][data-state="ready"]')
        model.wait_for(timeout=15_000)
        for agent in fleet.agents:  # the layer strip names every backend the plan chose
            assert model.locator(f'[data-endpoint="{agent.rpc_endpoint}"]').count() == 1
        assert "layers 0-" in model.inner_text()
        page.locator("#events li[data-kind='coordinator.ready']").first.wait_for(timeout=15_000)
        page.locator("#events li[data-kind='placement']").first.wait_for(timeout=15_000)
        # Memory bars: the model's share on each node's CPU device is drawn and named.
        assert "gemma:latest" in page.inner_text(f'[data-node="{fleet.agents[0].address}"]')
        page.select_option("#log-source", "model:gemma:latest")
        page.locator("#log", has_text="llama-server").wait_for(timeout=15_000)

        down = fleet.agents[1]
        down.proc.send_signal(signal.SIGSTOP)
        try:
            page.locator(f'[data-node="{down.address}"][data-state="unreachable"]').wait_for(timeout=15_000)
            page.locator("#events li[data-kind='node.unreachable']").first.wait_for(timeout=15_000)
            page.screenshot(path=str(tmp_path / "dashboard-node-down.png"), full_page=True)
        finally:
            down.proc.send_signal(signal.SIGCONT)
        page.locator(f'[data-node="{down.address}"][data-state="ready"]').wait_for(timeout=15_000)
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_dashboard_asks_for_the_api_key_and_works_with_it(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path, browser: Browser) -> None:
    keys = tmp_path / "keys"
    keys.write_text("dashboard-key-123\n")
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, agents=1,
                       controller_args=("--api-key-file", str(keys))) as fleet:
        page = browser.new_page()
        page.goto(f"{fleet.url}/ui/")
        # The model list is the API's (/api/tags): it needs the key. The nodes are a control route,
        # which this fleet, with no admin key, leaves to its own host: the browser here.
        page.locator("#key-form").wait_for(state="visible", timeout=15_000)
        assert page.locator("#prompt-model option").count() == 0
        page.fill("#key", "dashboard-key-123")
        page.click("#key-form button")
        page.locator('#prompt-model option[value="gemma:latest"]').wait_for(state="attached", timeout=15_000)
        page.locator(f'[data-node="{fleet.agents[0].address}"][data-state="ready"]').wait_for(timeout=15_000)
        page.locator("#live", has_text="live").wait_for(timeout=15_000)


def test_dashboard_works_with_the_admin_key_and_shows_why_an_api_key_is_not_enough(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path, browser: Browser) -> None:
    (tmp_path / "api-keys").write_text("dashboard-api-key\n")
    (tmp_path / "admin-keys").write_text("dashboard-admin-key\n")
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, agents=1,
                       controller_args=("--api-key-file", str(tmp_path / "api-keys"),
                                        "--admin-key-file", str(tmp_path / "admin-keys"))) as fleet:
        page = browser.new_page()
        page.goto(f"{fleet.url}/ui/")
        page.locator("#key-form").wait_for(state="visible", timeout=15_000)
        page.fill("#key", "dashboard-api-key")
        page.click("#key-form button")
        # The nodes are a control route: an API key gets the reason, not the data.
        page.locator("#key-form").wait_for(state="visible", timeout=15_000)
        page.get_by_text("control routes need an admin key").first.wait_for(timeout=15_000)
        assert page.locator("[data-node]").count() == 0
        page.fill("#key", "dashboard-admin-key")
        page.click("#key-form button")
        page.locator(f'[data-node="{fleet.agents[0].address}"][data-state="ready"]').wait_for(timeout=15_000)
        page.locator("#live", has_text="live").wait_for(timeout=15_000)


def test_dashboard_shows_a_pull_in_progress_and_then_the_holder(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path, browser: Browser) -> None:
    store = tmp_path / "store"
    store.mkdir()
    # 40 MiB/s: gemma's 253 MB take six seconds, several of the page's two-second refreshes.
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, agents=1,
                       controller_args=("--pull-rate-limit", "40MiB"), agent_args=(("--models-dir", str(store)),)) as fleet:
        address = fleet.agents[0].address
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{fleet.url}/ui/")
        page.locator(f'[data-node="{address}"][data-state="ready"]').wait_for(timeout=15_000)
        pull = subprocess.Popen(fleet.cli_argv("pull", "gemma", "--node", address), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            row = page.locator(f'[data-pull="gemma:latest"] [data-pull-node="{address}"][data-state="pulling"]')
            row.wait_for(timeout=30_000)
            assert "% (" in row.inner_text() and "→ gemma: pulling" in row.inner_text()
            page.screenshot(path=str(tmp_path / "dashboard-pulling.png"), full_page=True)
            _, stderr = pull.communicate(timeout=60)
        finally:
            pull.kill()
        assert pull.returncode == 0, stderr
        page.locator(f'[data-pull="gemma:latest"][data-state="done"] [data-pull-node="{address}"][data-state="done"]') \
            .wait_for(timeout=15_000)
        page.locator(f'[data-node="{address}"] [data-holds="gemma"]').wait_for(timeout=15_000)
        page.locator("#events li[data-kind='pull.done']").first.wait_for(timeout=15_000)
