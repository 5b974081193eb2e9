from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.install import (
    InstallError,
    Manifest,
    find_binaries,
    read_manifest,
    write_manifest,
)


def _manifest(directory: Path) -> Manifest:
    return Manifest(
        key="k", commit="abc", source_id="abc", source="/src", cmake_flags=["-DGGML_RPC=ON"],
        backends=["CPU", "RPC"], rpc_server=str(directory / "bin" / "ggml-rpc-server"),
        llama_server=str(directory / "bin" / "llama-server"), rpc_protocol_version="7.0.0",
        version="version: 1 (abc)", built_at_unix_ms=1,
    )


def test_manifest_round_trip_and_atomic_write(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert manifest.install_dir == tmp_path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "does not hold a JSON object"),
        ('{"schema": 99}', "unsupported manifest schema"),
        ('{"schema": 1, "key": "k"}', "incomplete"),
    ],
)
def test_bad_manifests_are_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(InstallError, match=message):
        read_manifest(tmp_path)


def test_manifest_with_unknown_fields_is_refused(tmp_path: Path) -> None:
    data = json.loads(_manifest(tmp_path).to_json())
    data["surprise"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InstallError, match="unknown fields: surprise"):
        read_manifest(tmp_path)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="no manifest.json"):
        read_manifest(tmp_path)


def _exe(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    os.chmod(path, 0o755)


@pytest.mark.parametrize("where", ["", "bin", "build/bin"])
def test_find_binaries_in_an_install_or_build_tree(tmp_path: Path, where: str) -> None:
    folder = tmp_path / where
    _exe(folder / "ggml-rpc-server")
    _exe(folder / "llama-server")
    assert find_binaries(tmp_path) == (folder / "ggml-rpc-server", folder / "llama-server")


def test_find_binaries_accepts_the_old_rpc_server_name(tmp_path: Path) -> None:
    _exe(tmp_path / "bin" / "rpc-server")
    _exe(tmp_path / "bin" / "llama-server")
    assert find_binaries(tmp_path)[0].name == "rpc-server"


def test_find_binaries_refuses_a_folder_without_both(tmp_path: Path) -> None:
    _exe(tmp_path / "bin" / "llama-server")
    with pytest.raises(InstallError, match="no llama.cpp binaries"):
        find_binaries(tmp_path)
