from __future__ import annotations

import os
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.probe import ProbeError, probe_rpc_server


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


def test_a_silent_server_is_reported_as_a_timeout_not_as_our_sigterm(tmp_path: Path) -> None:
    silent = _script(tmp_path / "ggml-rpc-server", "echo 'still initialising'\nexec sleep 60\n")
    with pytest.raises(ProbeError) as caught:
        probe_rpc_server(silent, timeout_s=1.0)
    assert str(caught.value) == "ggml-rpc-server did not start: no complete banner within 1 s"
    assert "still initialising" in caught.value.detail


def test_a_server_that_exits_is_reported_with_its_exit(tmp_path: Path) -> None:
    failing = _script(tmp_path / "ggml-rpc-server", "echo 'No devices found' >&2\nexit 3\n")
    with pytest.raises(ProbeError, match="did not start: exited with code 3") as caught:
        probe_rpc_server(failing, timeout_s=10.0)
    assert "No devices found" in caught.value.detail
