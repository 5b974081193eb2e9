"""Bad input reaches the operator as one line and an exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

AGENT = str(Path(sys.executable).parent / "llamafleet-agent")
CONTROLLER = str(Path(sys.executable).parent / "llamafleet")


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        ([AGENT, "build", "--source", "/no/such.tar.gz"], 2, "error: source not found: no such file '/no/such.tar.gz'"),
        ([AGENT, "build", "--source", "not-a-source"], 2, "error: unknown source kind 'not-a-source'"),
        ([CONTROLLER, "build", "--source", "/no/such.tar.gz"], 2, "error: source not found"),
    ],
)
def test_bad_build_sources(argv: list[str], code: int, message: str, tmp_path: Path) -> None:
    result = subprocess.run([*argv, "--state-dir", str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == code
    assert result.stderr.startswith(message)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir()), "nothing may be written for bad input"


def test_tarball_without_cmakelists_exits_1_and_installs_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "empty.tar.gz"
    subprocess.run(["tar", "czf", str(archive), "-C", str(tmp_path), "--files-from", "/dev/null"], check=True)
    state = tmp_path / "state"
    result = subprocess.run([AGENT, "build", "--source", str(archive), "--state-dir", str(state)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "build failed at step 'resolve'" in result.stderr and "no CMakeLists.txt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (state / "llama.cpp" / "current").exists()
