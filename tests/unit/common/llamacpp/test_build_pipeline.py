"""The build pipeline end to end on a tiny CMake project (seconds, not minutes).

The real llama.cpp build is in tests/integration/test_llamacpp_build.py; these tests cover the
pipeline's rules: keys, no-op rebuilds, atomic activation, failures that leave `current` alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.build import (
    BuildError,
    BuildEvent,
    BuildLayout,
    BuildOptions,
    check_cuda_architectures,
    cmake_flags,
    current_manifest,
    run_build,
)
from llamafleet.common.errors import UsageError
from llamafleet.common.llamacpp.install import read_manifest
from llamafleet.common.llamacpp.patches import Patch
from tests.unit.common.llamacpp.fake_tree import BROKEN, RPC_EXITS, make_fake_tree

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _build(source: Path, state: Path, events: list[BuildEvent] | None = None, patches: tuple[Patch, ...] = ()):
    sink = events.append if events is not None else (lambda event: None)
    return run_build(BuildOptions(source=str(source), state_dir=state, cuda=False, jobs=2, patches=patches), sink)


def test_build_installs_verifies_and_activates(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "src")
    events: list[BuildEvent] = []
    outcome = _build(tree, tmp_path / "state", events)
    manifest = outcome.manifest
    assert not outcome.cached
    assert manifest.rpc_protocol_version == "7.0.0"
    assert manifest.version == "version: 42 (fake)"
    assert manifest.backends == ["CPU", "RPC"]
    assert manifest.commit is None and manifest.source_id.startswith("sha256:")
    assert "-DGGML_RPC=ON" in manifest.cmake_flags
    layout = BuildLayout.under(tmp_path / "state")
    assert layout.current.resolve() == (layout.installs / manifest.key).resolve()
    assert current_manifest(tmp_path / "state") == manifest
    assert os.access(manifest.rpc_server, os.X_OK) and os.access(manifest.llama_server, os.X_OK)
    steps = [event.step for event in events]
    for step in ("resolve", "configure", "compile", "install", "verify", "activate"):
        assert step in steps
    assert any(event.total and event.done == event.total for event in events if event.step == "compile")
    # The work tree is cleaned after success; only the install stays.
    assert not list(layout.work.iterdir())


def test_second_build_of_the_same_key_is_a_noop(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "src")
    first = _build(tree, tmp_path / "state").manifest
    binary_mtime = Path(first.rpc_server).stat().st_mtime_ns
    second = _build(tree, tmp_path / "state")
    assert second.cached
    assert second.manifest == first
    assert Path(first.rpc_server).stat().st_mtime_ns == binary_mtime


def test_a_changed_source_gets_a_new_key_and_current_moves(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "src")
    first = _build(tree, tmp_path / "state").manifest
    (tree / "server.c").write_text((tree / "server.c").read_text().replace("42", "43"))
    second = _build(tree, tmp_path / "state").manifest
    assert second.key != first.key and second.version == "version: 43 (fake)"
    assert current_manifest(tmp_path / "state") == second
    # Rebuilding the first source switches back without compiling.
    (tree / "server.c").write_text((tree / "server.c").read_text().replace("43", "42"))
    again = _build(tree, tmp_path / "state")
    assert again.cached and current_manifest(tmp_path / "state") == first


def test_old_rpc_server_target_name_is_detected(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "src", rpc_name="rpc-server")
    manifest = _build(tree, tmp_path / "state").manifest
    assert Path(manifest.rpc_server).name == "rpc-server"


def _assert_current_unchanged(state: Path, before: object) -> None:
    assert current_manifest(state) == before
    installs = BuildLayout.under(state).installs
    assert not [p for p in installs.iterdir() if p.name.startswith(".staging-")]


def test_compile_failure_names_the_step_and_shows_the_compiler_output(tmp_path: Path) -> None:
    good = _build(make_fake_tree(tmp_path / "good"), tmp_path / "state").manifest
    tree = make_fake_tree(tmp_path / "bad", rpc_source=BROKEN)
    with pytest.raises(BuildError) as caught:
        _build(tree, tmp_path / "state")
    assert caught.value.step == "compile"
    assert "build failed at step 'compile'" in str(caught.value)
    assert "error" in caught.value.detail and "rpc.c" in caught.value.detail
    _assert_current_unchanged(tmp_path / "state", good)


def test_configure_failure(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "src", cmake_extra='message(FATAL_ERROR "broken on purpose")\n')
    with pytest.raises(BuildError) as caught:
        _build(tree, tmp_path / "state")
    assert caught.value.step == "configure"
    assert "broken on purpose" in caught.value.detail
    assert current_manifest(tmp_path / "state") is None


def test_binary_that_does_not_start_fails_verify_and_is_not_activated(tmp_path: Path) -> None:
    good = _build(make_fake_tree(tmp_path / "good"), tmp_path / "state").manifest
    tree = make_fake_tree(tmp_path / "bad", rpc_source=RPC_EXITS)
    with pytest.raises(BuildError) as caught:
        _build(tree, tmp_path / "state")
    assert caught.value.step == "verify"
    assert "exited with code 1" in str(caught.value)
    assert "No devices found" in caught.value.detail
    _assert_current_unchanged(tmp_path / "state", good)


def test_tree_without_rpc_target(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "src", rpc_name="something-else")
    with pytest.raises(BuildError, match="no rpc-server target"):
        _build(tree, tmp_path / "state")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_too_little_disk_space_is_refused_before_building(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(BuildError, match=r"step 'resolve': not enough disk space .* GiB free"):
            _build(make_fake_tree(tmp_path / "src"), state)
        assert current_manifest(state) is None
    finally:
        subprocess.run(["umount", str(state)], check=True)


def test_cuda_flags() -> None:
    assert "-DGGML_CUDA=ON" not in cmake_flags(False, None)
    flags = cmake_flags(True, "90")
    assert "-DGGML_CUDA=ON" in flags and "-DCMAKE_CUDA_ARCHITECTURES=90" in flags


@pytest.mark.parametrize("value", ["90", "86;89", "90a-real;89-virtual", "native", "all", "all-major"])
def test_cuda_architectures_cmake_reads_pass(value: str) -> None:
    assert check_cuda_architectures(value) == value


@pytest.mark.parametrize("value", ["", "90;", "-DCMAKE_C_COMPILER=/tmp/x", "90 -DX=1", "$(id)", "native;90\n"])
def test_cuda_architectures_that_are_not_a_list_are_refused_before_building(value: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="CUDA architectures"):
        run_build(BuildOptions(str(make_fake_tree(tmp_path / "src")), tmp_path / "state", cuda=True,
                               cuda_architectures=value))
    assert not (tmp_path / "state").exists()


def test_manifest_on_disk_matches_returned_manifest(tmp_path: Path) -> None:
    manifest = _build(make_fake_tree(tmp_path / "src"), tmp_path / "state").manifest
    assert read_manifest(manifest.install_dir) == manifest
