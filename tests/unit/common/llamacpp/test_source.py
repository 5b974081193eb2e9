from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from llamafleet.common.errors import UsageError
from llamafleet.common.llamacpp import source as source_module
from llamafleet.common.llamacpp.source import (
    DirSource,
    GitSource,
    SourceError,
    TarballSource,
    check_git_ref,
    parse_source,
    prepare_source,
)
from tests.unit.common.llamacpp.fake_tree import make_fake_tree


@pytest.mark.parametrize(
    ("text", "url", "ref"),
    [
        ("https://github.com/ggml-org/llama.cpp", "https://github.com/ggml-org/llama.cpp", None),
        ("https://github.com/ggml-org/llama.cpp@b6000", "https://github.com/ggml-org/llama.cpp", "b6000"),
        ("https://github.com/ggml-org/llama.cpp.git@v1.2/x", "https://github.com/ggml-org/llama.cpp.git@v1.2/x", None),
        ("git@github.com:ggml-org/llama.cpp.git", "git@github.com:ggml-org/llama.cpp.git", None),
        ("git@github.com:ggml-org/llama.cpp.git@abc123", "git@github.com:ggml-org/llama.cpp.git", "abc123"),
        ("ssh://user@host/repo@main", "ssh://user@host/repo", "main"),
        ("file:///srv/llama.cpp@0123456789abcdef", "file:///srv/llama.cpp", "0123456789abcdef"),
    ],
)
def test_git_urls_split_at_the_ref(text: str, url: str, ref: str | None) -> None:
    assert parse_source(text) == GitSource(url, ref)


def test_git_url_with_empty_ref_is_refused() -> None:
    with pytest.raises(UsageError, match="empty git ref"):
        parse_source("https://example.invalid/llama.cpp@")


def test_existing_directory_is_a_dir_source(tmp_path: Path) -> None:
    assert parse_source(str(tmp_path)) == DirSource(tmp_path.resolve())


def test_tarball_with_and_without_subdir(tmp_path: Path) -> None:
    archive = tmp_path / "src.tar.gz"
    archive.write_bytes(b"")
    assert parse_source(str(archive)) == TarballSource(archive.resolve(), "")
    assert parse_source(f"{archive}:pkg/vendor/llama.cpp/") == TarballSource(archive.resolve(), "pkg/vendor/llama.cpp")


def test_tarball_path_containing_a_colon(tmp_path: Path) -> None:
    folder = tmp_path / "a:b"
    folder.mkdir()
    archive = folder / "src.tgz"
    archive.write_bytes(b"")
    assert parse_source(f"{archive}:sub") == TarballSource(archive.resolve(), "sub")


@pytest.mark.parametrize("subdir", ["../escape", "/etc"])
def test_tarball_subdir_must_stay_inside(tmp_path: Path, subdir: str) -> None:
    archive = tmp_path / "src.tar"
    archive.write_bytes(b"")
    with pytest.raises(UsageError, match="relative path inside"):
        parse_source(f"{archive}:{subdir}")


@pytest.mark.parametrize("text", ["", "llama.cpp", "ftp:/nothing"])
def test_unknown_source_kinds_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="source"):
        parse_source(text)


def test_missing_tarball_says_which_file() -> None:
    with pytest.raises(UsageError, match=r"no such file '/no/such.tar.gz'"):
        parse_source("/no/such.tar.gz:sub")


def test_a_file_that_is_not_an_archive_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_text("hi")
    with pytest.raises(UsageError, match="not an archive"):
        parse_source(str(plain))


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_tarball_subdir_is_unpacked_and_named_by_digest(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "sdist.tar.gz", {
        "pkg-1.0/vendor/llama.cpp/CMakeLists.txt": b"project(x)\n",
        "pkg-1.0/vendor/llama.cpp/ggml/x.h": b"",
        "pkg-1.0/vendor/llama.cpp/.git": b"gitdir: ../../.git/modules/vendor/llama.cpp\n",
        "pkg-1.0/setup.py": b"",
    })
    source = prepare_source(parse_source(f"{archive}:pkg-1.0/vendor/llama.cpp"), tmp_path / "sources")
    assert source.commit is None
    assert source.source_id.startswith("sha256:") and source.source_id.endswith(":pkg-1.0/vendor/llama.cpp")
    assert (source.directory / "CMakeLists.txt").is_file()
    # Only the subdirectory was unpacked.
    assert not list((tmp_path / "sources").rglob("setup.py"))
    # A second prepare reuses the unpacked tree.
    assert prepare_source(parse_source(f"{archive}:pkg-1.0/vendor/llama.cpp"), tmp_path / "sources") == source


def test_tarball_single_top_folder_is_entered(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "llama.cpp-b1.tar.gz", {"llama.cpp-b1/CMakeLists.txt": b"", "llama.cpp-b1/ggml/a": b""})
    source = prepare_source(parse_source(str(archive)), tmp_path / "sources")
    assert source.directory.name == "llama.cpp-b1"


def test_tarball_without_cmakelists_is_refused_and_leaves_nothing_half_done(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "other.tar.gz", {"other/README": b"hello"})
    with pytest.raises(SourceError, match="no CMakeLists.txt"):
        prepare_source(parse_source(str(archive)), tmp_path / "sources")
    assert not list((tmp_path / "sources").glob(".unpack-*"))


def test_tarball_missing_subdir(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", {"a/CMakeLists.txt": b""})
    with pytest.raises(SourceError, match="has no folder 'b'"):
        prepare_source(parse_source(f"{archive}:b"), tmp_path / "sources")


def test_tarball_with_escaping_member_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "evil.tar.gz", {"../../evil": b"x", "CMakeLists.txt": b""})
    with pytest.raises(SourceError, match="cannot unpack"):
        prepare_source(parse_source(str(archive)), tmp_path / "sources")
    assert not (tmp_path / "evil").exists()


def test_corrupt_tarball_is_a_clear_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(SourceError, match="cannot unpack"):
        prepare_source(parse_source(str(archive)), tmp_path / "sources")


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    repo = make_fake_tree(tmp_path / "upstream")
    _git("init", "-q", "-b", "main", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one", cwd=repo)
    _git("tag", "b1", cwd=repo)
    return repo


def test_git_source_at_a_tag_and_at_a_commit(git_repo: Path, tmp_path: Path) -> None:
    commit = _git("rev-parse", "HEAD", cwd=git_repo)
    by_tag = prepare_source(parse_source(f"file://{git_repo}@b1"), tmp_path / "s1")
    by_commit = prepare_source(parse_source(f"file://{git_repo}@{commit}"), tmp_path / "s2")
    assert by_tag.commit == by_commit.commit == by_tag.source_id == commit
    assert (by_tag.directory / "CMakeLists.txt").is_file()


def test_git_ref_that_does_not_exist(git_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="'no-such-ref' does not exist"):
        prepare_source(parse_source(f"file://{git_repo}@no-such-ref"), tmp_path / "s")


def test_git_url_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot fetch"):
        prepare_source(parse_source(f"file://{tmp_path}/nothing-here"), tmp_path / "s")


def test_dir_source_uses_the_commit_when_clean_and_a_digest_when_dirty(git_repo: Path) -> None:
    clean = prepare_source(DirSource(git_repo), git_repo / "unused")
    assert clean.commit == _git("rev-parse", "HEAD", cwd=git_repo)
    (git_repo / "rpc.c").write_text("/* local change */")
    dirty = prepare_source(DirSource(git_repo), git_repo / "unused")
    assert dirty.commit is None and dirty.source_id.startswith("sha256:")
    (git_repo / "rpc.c").write_text("/* another change */")
    assert prepare_source(DirSource(git_repo), git_repo / "unused").source_id != dirty.source_id


HOSTILE = json.loads((Path(__file__).parents[3] / "fixtures" / "hostile" / "sources.json").read_text())["cases"]
AGENT = str(Path(sys.executable).parent / "llamafleet-agent")
# The payload of issue 14: the text after '@' reached `git fetch` as an option. A ref cannot
# hold '/', so the absolute path of the file it creates comes from the environment.
UPLOAD_PACK = "--upload-pack=touch${IFS}$LLAMAFLEET_TEST_MARKER;git-upload-pack"


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "INJECTED"
    monkeypatch.setenv("LLAMAFLEET_TEST_MARKER", str(path))
    return path


def test_upload_pack_in_the_ref_runs_nothing_from_the_build_command(git_repo: Path, tmp_path: Path,
                                                                     marker: Path) -> None:
    result = subprocess.run([AGENT, "build", "--source", f"file://{git_repo}@{UPLOAD_PACK}",
                             "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert not marker.exists()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "starts with '-'" in lines[0] and "Traceback" not in result.stderr


def test_upload_pack_with_a_literal_absolute_path_runs_nothing(git_repo: Path, tmp_path: Path) -> None:
    """The brief's own spelling: with a '/' after '@' the whole text is the URL, and no such repo exists."""
    literal = tmp_path / "X"
    with pytest.raises(SourceError, match="cannot fetch") as refused:
        prepare_source(parse_source(f"file://{git_repo}@--upload-pack=touch${{IFS}}{literal};git-upload-pack"),
                       tmp_path / "s")
    assert not literal.exists() and "\n" not in refused.value.message


def test_a_spec_built_without_parse_source_is_checked_too(git_repo: Path, tmp_path: Path, marker: Path) -> None:
    with pytest.raises(UsageError, match="starts with '-'"):
        prepare_source(GitSource(f"file://{git_repo}", UPLOAD_PACK), tmp_path / "s")
    with pytest.raises(UsageError, match="starts with '-'"):
        prepare_source(GitSource("-oProxyCommand=x@host:repo", None), tmp_path / "s")
    assert not marker.exists()


def test_end_of_options_alone_keeps_a_ref_from_being_an_option(git_repo: Path, tmp_path: Path, marker: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Second layer: with the up-front check switched off, git itself reads the ref as a ref."""
    monkeypatch.setattr(source_module, "check_git_ref", lambda ref: ref)
    with pytest.raises(SourceError, match="does not exist"):
        prepare_source(GitSource(f"file://{git_repo}", UPLOAD_PACK), tmp_path / "s")
    assert not marker.exists()


@pytest.mark.parametrize("case", HOSTILE, ids=[c["name"] for c in HOSTILE])
def test_hostile_sources_are_refused_in_one_line(case: dict[str, str], git_repo: Path, tmp_path: Path,
                                                 marker: Path) -> None:
    with pytest.raises(UsageError) as refused:
        parse_source(case["source"].replace("{repo}", str(git_repo)))
    message = refused.value.message
    assert case["contains"] in message and "\n" not in message
    assert not marker.exists()


VALID_REFS = ["main", "b6000", "v1.2.3", "release/b6000", "refs/tags/b1", "HEAD", "0123456789abcdef" * 2 + "01234567",
              "feature_x-y", "a{b}", "x@y"]
INVALID_REFS = ["-x", "--upload-pack=x", "a..b", "main~1", "a^", "a:b", "a b", "a?", "a*", "a[b", "a\\b", "/a", "a/",
                "a//b", ".a", "a/.b", "a.lock", "a/b.lock/c", "a.", "@", "a@{1}", "a\tb", "a\x7f"]


@pytest.mark.parametrize("ref", VALID_REFS)
def test_branch_tag_and_commit_names_pass(ref: str) -> None:
    assert check_git_ref(ref) == ref


@pytest.mark.parametrize("ref", INVALID_REFS)
def test_what_git_check_ref_format_refuses_is_refused(ref: str) -> None:
    with pytest.raises(UsageError, match="git ref"):
        check_git_ref(ref)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("ref", VALID_REFS + INVALID_REFS[2:])
def test_the_check_agrees_with_git_check_ref_format(ref: str) -> None:
    """The same answer as git's own (refs starting with '-' left out: git would read them as options)."""
    by_git = subprocess.run(["git", "check-ref-format", "--allow-onelevel", ref], capture_output=True).returncode == 0
    try:
        check_git_ref(ref)
        ours = True
    except UsageError:
        ours = False
    assert ours == by_git
