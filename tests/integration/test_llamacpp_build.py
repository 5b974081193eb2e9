"""The real llama.cpp build (prepared, cached, by scripts/test.sh) and its two binaries at work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.banner import RpcBanner
from llamafleet.common.llamacpp.build import BuildLayout
from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.probe import free_loopback_port, probe_rpc_server
from llamafleet.common.process import line_buffered, spawn_group, stop_group

pytestmark = [pytest.mark.integration, pytest.mark.build]


def test_second_build_of_the_sdist_is_a_noop(llama_cpp: Manifest) -> None:
    source = f"{os.environ['LLAMAFLEET_TEST_SDIST']}:{os.environ['LLAMAFLEET_TEST_SDIST_SUBDIR']}"
    state = os.environ["LLAMAFLEET_TEST_STATE_DIR"]
    binary_mtime = Path(llama_cpp.rpc_server).stat().st_mtime_ns
    result = subprocess.run(
        [str(Path(sys.executable).parent / "llamafleet-agent"), "build", "--source", source, "--state-dir", state],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(llama_cpp.install_dir)
    assert "already built" in result.stderr
    assert Path(llama_cpp.rpc_server).stat().st_mtime_ns == binary_mtime
    assert BuildLayout.under(Path(state)).current.resolve() == llama_cpp.install_dir.resolve()


def test_manifest_names_the_source_and_rpc_protocol(llama_cpp: Manifest) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", llama_cpp.rpc_protocol_version)
    # The sdist carries no git metadata: the identity is the tarball's digest and subdirectory.
    assert llama_cpp.commit is None
    assert llama_cpp.source_id.startswith("sha256:") and llama_cpp.source_id.endswith("vendor/llama.cpp")
    assert {"CPU", "RPC"} <= set(llama_cpp.backends)
    assert "-DGGML_RPC=ON" in llama_cpp.cmake_flags
    assert Path(llama_cpp.rpc_server).name in ("ggml-rpc-server", "rpc-server")
    assert llama_cpp.version.startswith("version:")


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post_json(url: str, body: dict[str, object], timeout: float = 120) -> dict[str, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_rpc_server_and_llama_server_generate_tokens_together(llama_cpp: Manifest, test_model: Path) -> None:
    """llama-server offloads every layer to the built rpc-server and answers a completion."""
    assert probe_rpc_server(Path(llama_cpp.rpc_server)).complete
    rpc_port, http_port = free_loopback_port(), free_loopback_port()
    rpc = spawn_group(line_buffered([llama_cpp.rpc_server, "-H", "127.0.0.1", "-p", str(rpc_port)]))
    server = None
    try:
        banner = RpcBanner()
        assert rpc.stdout is not None
        while not banner.complete:
            line = rpc.stdout.readline()
            assert line, f"rpc-server exited before its banner: {rpc.wait()}"
            banner.feed(line.decode())
        assert banner.endpoint == f"127.0.0.1:{rpc_port}"
        server = spawn_group([
            llama_cpp.llama_server, "-m", str(test_model), "--rpc", f"127.0.0.1:{rpc_port}", "-ngl", "99",
            "--host", "127.0.0.1", "--port", str(http_port), "-c", "512", "--no-webui",
        ])
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"llama-server exited: {server.stdout.read().decode()[-2000:]}"  # type: ignore[union-attr]
            try:
                status, _ = _get(f"http://127.0.0.1:{http_port}/health")
            except OSError:
                status = 0
            if status == 200:
                break
            assert time.monotonic() < deadline, "llama-server never became healthy"
            time.sleep(0.25)
        reply = _post_json(f"http://127.0.0.1:{http_port}/completion",
                           {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0})
        assert isinstance(reply["content"], str) and reply["content"].strip()
        assert reply["tokens_predicted"] == 8
    finally:
        if server is not None:
            stop_group(server)
        stop_group(rpc)
    output = rpc.stdout.read().decode()
    assert "Accepted client connection" in output
