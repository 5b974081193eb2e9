"""install-rpc-service.sh and the agent unit under a real systemd (PID 1 of an nspawn container).

The container is a tmpfs overlay of this machine's root, so the repository and the test cache
are visible inside; nothing written inside reaches the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.systemd.nspawn import Container, booted_container, cannot_boot_reason

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "install-rpc-service.sh"
UNIT = "llamafleet-agent.service"
# Folders whose content --uninstall must restore exactly (systemd's own bookkeeping excluded).
SNAPSHOT = ("find /etc /opt /var/lib /var/cache /usr/local -xdev "
            r"\( -path /var/lib/systemd -o -path /var/cache/ldconfig -o -path /etc/ld.so.cache \) -prune "
            # A directory's size changes when the overlay copies it up: compare modes only.
            r"-o -type d -printf '%p d %m\n' -o -printf '%p %y %s %m\n' | sort")

pytestmark = [pytest.mark.integration, pytest.mark.systemd]
reason = cannot_boot_reason()
if reason:
    pytestmark.append(pytest.mark.skip(reason=f"cannot boot a systemd container here: {reason}"))


def shared_cache() -> Path:
    return Path(os.environ.get("LLAMAFLEET_TEST_CACHE", Path.home() / ".cache" / "llamafleet-test")).resolve()


def shared_paths(*extra: tuple[Path, str]) -> list[tuple[Path, str]]:
    """The checkout and the test cache, at the same paths inside: the container's /tmp is its
    own, and a checkout or cache under /tmp (a CI clone) would otherwise be invisible there."""
    return [(REPO, str(REPO)), (shared_cache(), str(shared_cache())), *extra]


def wheelhouse() -> Path:
    """llamafleet's wheel (fresh) and its dependencies (cached): pip inside has no network."""
    cache = shared_cache()
    deps = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    house = cache / f"wheelhouse-{deps}"
    house.mkdir(parents=True, exist_ok=True)
    for old in house.glob("llamafleet-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        # Built from a copy: setuptools leaves a build/ folder wherever it builds.
        source = Path(tmp) / "src"
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info",
                                                                    "__pycache__", ".*_cache"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(house),
                        str(source)], check=True, capture_output=True, timeout=600)
    return house


def _adoptable_llama_cpp(container: Container, llama_cpp: Manifest) -> str:
    """Binaries the service's dynamic user can read; the rpc-server starts 2 s late on purpose."""
    container.run(
        "mkdir -p /opt/lf-test-llama/bin /opt/lf-test-llama/real && "
        f"cp {llama_cpp.rpc_server} /opt/lf-test-llama/real/ggml-rpc-server && "
        f"cp {llama_cpp.llama_server} /opt/lf-test-llama/bin/llama-server && "
        "printf '#!/bin/sh\\nsleep 2\\nexec /opt/lf-test-llama/real/ggml-rpc-server \"$@\"\\n' "
        "> /opt/lf-test-llama/bin/ggml-rpc-server && chmod 755 /opt/lf-test-llama/bin/*")
    return "/opt/lf-test-llama"


def _journal_monotonic(container: Container, pattern: str) -> float:
    lines = container.run(f"journalctl -o short-monotonic --no-pager | grep -E '{pattern}' | tail -n 1").stdout
    match = re.match(r"\[\s*([\d.]+)\]", lines.strip())
    assert match, f"no journal line matches {pattern!r}"
    return float(match.group(1))


def test_install_watchdog_stop_and_uninstall_under_real_systemd(tmp_path: Path, llama_cpp: Manifest) -> None:
    house = wheelhouse()
    wheel = next(house.glob("llamafleet-*.whl"))
    with booted_container(tmp_path, binds_ro=shared_paths()) as container:
        llama_dir = _adoptable_llama_cpp(container, llama_cpp)
        before = container.run(SNAPSHOT).stdout
        install = container.run(
            f"ACTIVE_TIMEOUT=90 {SCRIPT} --from {wheel} --pip-args '--no-index --find-links {house}' "
            f"--python /usr/bin/python3 --llama-cpp {llama_dir} --watchdog-sec 4 --no-start", timeout=300)
        assert "installing /etc/systemd/system/llamafleet-agent.service" in install.stdout
        token = container.run("stat -c '%a %U' /etc/llamafleet/agent.token").stdout.split()
        assert token == ["600", "root"]

        # Active only after READY=1: watch it activate while the (slow) rpc-server comes up.
        container.run(f"systemctl start --no-block {UNIT}")
        seen, deadline = [], time.monotonic() + 90
        while (state := container.run(f"systemctl is-active {UNIT}", check=False).stdout.strip()) != "active":
            assert state != "failed" and time.monotonic() < deadline, container.run(f"journalctl -u {UNIT}").stdout
            seen.append(state)
            time.sleep(0.1)
        assert seen.count("activating") >= 10, f"never seen activating for a second: {seen}"
        running_at = _journal_monotonic(container, "rpc-server starting → running")
        started_at = _journal_monotonic(container, "Started llamafleet-agent.service")
        assert running_at <= started_at, "systemd called the unit started before the rpc-server ran"
        status = container.show(UNIT, "StatusText")
        assert status.startswith("rpc-server running at 127.0.0.1:50052"), status
        assert container.show(UNIT, "NRestarts") == "0"
        first_rpc = container.run("pgrep -f 'real/ggml-rpc-serve[r]'").stdout.split()
        assert len(first_rpc) == 1

        # A hung agent: the watchdog kills it, systemd restarts it, the old rpc-server goes too.
        main_pid = container.show(UNIT, "MainPID")
        container.run(f"kill -STOP {main_pid}")
        deadline = time.monotonic() + 60
        while not (container.show(UNIT, "NRestarts") == "1"
                   and container.run(f"systemctl is-active {UNIT}", check=False).stdout.strip() == "active"):
            assert time.monotonic() < deadline, container.run(f"journalctl -u {UNIT} --no-pager").stdout[-3000:]
            time.sleep(0.2)
        journal = container.run(f"journalctl -u {UNIT} --no-pager").stdout
        assert "Watchdog timeout" in journal
        now_rpc = container.run("pgrep -f 'real/ggml-rpc-serve[r]'").stdout.split()
        assert len(now_rpc) == 1 and now_rpc != first_rpc, "the hung agent's rpc-server outlived it"

        # systemctl stop leaves nothing of the unit behind.
        container.run(f"systemctl stop {UNIT}")
        leftovers = container.run("pgrep -af 'llamafleet-agen[t]|ggml-rpc-serve[r]'", check=False).stdout
        assert leftovers == "", leftovers

        # --uninstall puts the machine back as it was.
        container.run(f"{SCRIPT} --uninstall", timeout=120)
        after = container.run(SNAPSHOT).stdout
        assert after == before, "\n".join(line for line in
                                          set(after.splitlines()) ^ set(before.splitlines()))


def test_build_rerun_token_reuse_and_uninstall(tmp_path: Path) -> None:
    """--build-llama-cpp builds as the service's user into its state dir; a second run changes
    nothing it need not; --uninstall removes the build too. (A tiny CMake tree stands in for
    llama.cpp here: the real build is tested elsewhere and takes minutes.)"""
    from tests.unit.common.llamacpp.fake_tree import make_fake_tree

    house = wheelhouse()
    wheel = next(house.glob("llamafleet-*.whl"))
    make_fake_tree(tmp_path / "src" / "llama.cpp")
    (tmp_path / "src" / "fleet.token").write_text("the-fleet-token\n")
    # The container's /tmp is its own: the test's files come in through a read-only bind.
    with booted_container(tmp_path / "c", binds_ro=shared_paths((tmp_path / "src", "/mnt/src"))) as container:
        container.run("mkdir -p /opt/src && cp -r /mnt/src/llama.cpp /mnt/src/fleet.token /opt/src/")
        before = container.run(SNAPSHOT).stdout
        command = (f"{SCRIPT} --from {wheel} --pip-args '--no-index --find-links {house}' --python /usr/bin/python3 "
                   # --no-patches: the tiny tree is not llama.cpp, the patch set would not apply.
                   "--build-llama-cpp /opt/src/llama.cpp --no-patches --token-file /opt/src/fleet.token --no-start")
        container.run(command, timeout=300)
        manifest = container.run("cat /var/lib/private/llamafleet-agent/llama.cpp/current/manifest.json").stdout
        assert '"rpc_protocol_version": "7.0.0"' in manifest
        assert container.run("cat /etc/llamafleet/agent.token").stdout == "the-fleet-token\n"
        recorded = container.run("cat /etc/llamafleet/install-manifest").stdout
        rerun = container.run(command, timeout=300)
        assert "creating /opt/llamafleet/venv" not in rerun.stdout and "writing /etc/llamafleet/agent.token" not in rerun.stdout
        assert container.run("cat /etc/llamafleet/install-manifest").stdout == recorded
        assert container.run(f"systemctl is-enabled {UNIT}").stdout.strip() == "enabled"
        container.run(f"{SCRIPT} --uninstall", timeout=120)
        after = container.run(SNAPSHOT).stdout
        assert after == before, "\n".join(set(after.splitlines()) ^ set(before.splitlines()))


def test_refusals_inside_a_real_systemd(tmp_path: Path) -> None:
    with booted_container(tmp_path, binds_ro=shared_paths()) as container:
        wildcard = container.run(f"{SCRIPT} --rpc-host 0.0.0.0 --dry-run", check=False)
        assert wildcard.returncode == 1 and "--i-know-rpc-is-unauthenticated" in wildcard.stderr
        old_python = container.run(f"{SCRIPT} --python /bin/false --dry-run", check=False)
        assert old_python.returncode == 1 and "not Python 3.11 or newer" in old_python.stderr
        nothing = container.run(f"{SCRIPT} --uninstall", check=False)
        assert nothing.returncode == 1 and "nothing to uninstall" in nothing.stderr
        dry = container.run(f"{SCRIPT} --dry-run --from /nonexistent-wheel.whl")
        assert "[dry-run]" in dry.stdout and "systemctl enable" in dry.stdout
        assert container.run("ls /etc/llamafleet /opt/llamafleet 2>&1", check=False).returncode != 0, \
            "--dry-run changed nothing"


def test_refuses_where_systemd_is_not_running() -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this machine runs systemd: the refusal cannot be shown outside a container")
    result = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 1 and "systemd is not running" in result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_every_unit_verifies(tmp_path: Path) -> None:
    venv_bin = Path(sys.executable).parent
    for template in sorted((REPO / "systemd").rglob("*.service")):
        user = template.parent.name == "user"
        rendered = tmp_path / ("user" if user else "system") / template.name
        rendered.parent.mkdir(exist_ok=True)
        rendered.write_text(template.read_text().replace("@BIN@", str(venv_bin)).replace("@CONF@", str(tmp_path)))
        env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
        result = subprocess.run(["systemd-analyze", *(["--user"] if user else []), "verify", str(rendered)],
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{template}: {result.stderr}"


def test_join_rotate_and_remove_under_real_systemd(tmp_path: Path, llama_cpp: Manifest) -> None:
    """--join: the unit comes up, the node is ready in a controller (inside the container too:
    its network is loopback only), a rotation retires the old credential, a removal the new one."""
    house = wheelhouse()
    wheel = next(house.glob("llamafleet-*.whl"))
    cli = Path(sys.executable).parent / "llamafleet"
    node = "127.0.0.1:50051"
    with booted_container(tmp_path, binds_ro=shared_paths()) as container:
        llama_dir = _adoptable_llama_cpp(container, llama_cpp)
        before = container.run(SNAPSHOT).stdout
        # The controller from the checkout's venv, state on /run (outside the uninstall check).
        container.run(f"systemd-run --quiet --unit lf-controller --collect {cli} serve --listen 127.0.0.1:11434 "
                      f"--state-dir /run/lf-controller --llama-cpp {llama_dir} --heartbeat-interval-s 0.5")
        deadline = time.monotonic() + 30
        while container.run(f"{cli} nodes", check=False).returncode != 0:
            assert time.monotonic() < deadline, container.run("journalctl -u lf-controller --no-pager").stdout
            time.sleep(0.2)
        join_token = container.run(f"{cli} token create --ttl 10m").stdout.strip()
        install = container.run(
            f"ACTIVE_TIMEOUT=90 {SCRIPT} --from {wheel} --pip-args '--no-index --find-links {house}' "
            f"--python /usr/bin/python3 --llama-cpp {llama_dir} --join http://127.0.0.1:11434 "
            f"--join-token {join_token}", timeout=300)
        assert "joins the controller at http://127.0.0.1:11434" in install.stdout
        assert container.run("stat -c '%a %U' /etc/llamafleet/join-token").stdout.split() == ["600", "root"]
        assert container.run("test -e /etc/llamafleet/agent.token", check=False).returncode != 0
        assert container.run(f"systemctl is-active {UNIT}").stdout.strip() == "active"

        def ready() -> bool:
            listing = container.run(f"{cli} nodes --json").stdout
            return any(n["address"] == node and n["state"] == "ready" and (n["rpc_server"] or {}).get("state")
                       == "running" for n in json.loads(listing))

        deadline = time.monotonic() + 60
        while not ready():
            assert time.monotonic() < deadline, container.run(f"journalctl -u {UNIT} --no-pager").stdout[-3000:]
            time.sleep(0.3)
        issued = "/var/lib/private/llamafleet-agent/credential"
        assert container.run(f"stat -c '%a' {issued}").stdout.strip() == "600"
        container.run(f"cp {issued} /run/old-credential")
        agent = "/opt/llamafleet/venv/bin/llamafleet-agent status --address 127.0.0.1:50051 --timeout 5 --token-file"
        assert container.run(f"{agent} /run/old-credential", check=False).returncode == 0

        rotated = container.run(f"{cli} node rotate {node}")
        assert "confirmed by the agent" in rotated.stdout
        old = container.run(f"{agent} /run/old-credential", check=False)
        assert old.returncode == 1 and "refused the token" in old.stderr
        assert container.run(f"{agent} {issued}", check=False).returncode == 0
        container.run(f"cp {issued} /run/new-credential")

        removed = container.run(f"{cli} node remove {node}")
        assert "revoked at the agent" in removed.stdout
        new = container.run(f"{agent} /run/new-credential", check=False)
        assert new.returncode == 1 and "refused the token" in new.stderr
        assert container.run(f"systemctl is-active {UNIT}").stdout.strip() == "active"

        container.run("systemctl stop lf-controller")
        container.run(f"{SCRIPT} --uninstall", timeout=120)
        after = container.run(SNAPSHOT).stdout
        assert after == before, "\n".join(set(after.splitlines()) ^ set(before.splitlines()))
