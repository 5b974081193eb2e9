"""The llama.cpp patch set in the build: applied to a mirror, recorded, keyed, refused clearly.

Runs the real pipeline on the tiny CMake tree of fake_tree.py (seconds); the real patches on the
real llama.cpp source are built by tests/integration/test_llamacpp_build.py and the test setup.
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.build import BuildError, BuildLayout, BuildOptions, run_build
from llamafleet.common.llamacpp.patches import Patch, PatchError, bundled_patches, read_patches
from tests.unit.common.llamacpp.fake_tree import SERVER, make_fake_tree

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _diff(path: str, old: str, new: str, header: str = "What: test patch\n\n") -> str:
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}")
    return header + "".join(lines)


PATCHED_SERVER = SERVER.replace("version: 42 (fake)", "version: 43 (patched)")


def _build(source: Path, state: Path, patches: tuple[Patch, ...]):
    return run_build(BuildOptions(source=str(source), state_dir=state, cuda=False, jobs=2, patches=patches))


def test_a_patched_build_runs_the_patched_code_records_the_patch_and_leaves_the_source_alone(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "src")
    patch = Patch("0001-version.patch", _diff("server.c", SERVER, PATCHED_SERVER))
    patched = _build(tree, tmp_path / "state", (patch,)).manifest
    assert patched.version == "version: 43 (patched)"
    assert patched.patches == [{"name": "0001-version.patch", "sha256": patch.sha256}]
    assert patched.patch_names == ["0001-version.patch"]
    # The operator's tree is untouched (the build patched a mirror of it).
    assert (tree / "server.c").read_text() == SERVER
    stock = _build(tree, tmp_path / "state", ()).manifest
    assert stock.version == "version: 42 (fake)" and stock.patches == []
    # Two installs side by side: the patch set is part of the key, a stock key has no suffix.
    assert patched.key == f"{stock.key}-p{patched.key.rsplit('-p', 1)[1]}"
    assert patched.install_dir != stock.install_dir and Path(patched.llama_server).exists()
    again = run_build(BuildOptions(source=str(tree), state_dir=tmp_path / "state", cuda=False, jobs=2,
                                   patches=(patch,)))
    assert again.cached and again.manifest.key == patched.key


def test_a_patch_that_does_not_apply_fails_the_build_naming_it_and_changes_nothing(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "src")
    state = tmp_path / "state"
    stock = _build(tree, state, ()).manifest
    stale = Patch("0007-stale.patch", _diff("server.c", SERVER.replace("42", "41"), PATCHED_SERVER))
    with pytest.raises(BuildError) as caught:
        _build(tree, state, (stale,))
    assert caught.value.step == "patch"
    assert "0007-stale.patch does not apply" in caught.value.message
    assert "--no-patches" in caught.value.message
    layout = BuildLayout.under(state)
    assert layout.current.resolve() == stock.install_dir.resolve()
    assert sorted(p.name for p in layout.installs.iterdir()) == [stock.key]
    assert (tree / "server.c").read_text() == SERVER


def test_the_second_patch_applies_on_top_of_the_first(tmp_path: Path) -> None:
    tree = make_fake_tree(tmp_path / "src")
    twice = PATCHED_SERVER.replace("built with cc", "built with cc, twice patched")
    patches = (Patch("0001-version.patch", _diff("server.c", SERVER, PATCHED_SERVER)),
               Patch("0002-more.patch", _diff("server.c", PATCHED_SERVER, twice)))
    manifest = _build(tree, tmp_path / "state", patches).manifest
    assert manifest.patch_names == ["0001-version.patch", "0002-more.patch"]
    out = subprocess.run([manifest.llama_server], capture_output=True, text=True, check=False)
    assert "twice patched" in out.stderr


def test_patch_files_are_named_and_change_something(tmp_path: Path) -> None:
    (tmp_path / "0001-good.patch").write_text(_diff("server.c", SERVER, PATCHED_SERVER))
    (tmp_path / "notes.txt").write_text("not a patch, ignored\n")
    assert [p.name for p in read_patches(tmp_path)] == ["0001-good.patch"]
    (tmp_path / "Fix-Thing.patch").write_text(_diff("server.c", SERVER, PATCHED_SERVER))
    with pytest.raises(PatchError, match="NNNN-name.patch"):
        read_patches(tmp_path)
    (tmp_path / "Fix-Thing.patch").unlink()
    (tmp_path / "0002-empty.patch").write_text("What: nothing\n")
    with pytest.raises(PatchError, match="changes no file"):
        read_patches(tmp_path)


def test_the_bundled_set_is_the_repository_folder_with_headers() -> None:
    patches = bundled_patches()
    folder = Path(__file__).resolve().parents[4] / "patches" / "llama.cpp"
    assert [p.name for p in patches] == sorted(p.name for p in folder.glob("*.patch"))
    for patch in patches:
        header = patch.text.split("diff --git", 1)[0]
        for part in ("What:", "Why:", "Upstream:"):
            assert part in header, f"{patch.name} lacks '{part}' in its header"
