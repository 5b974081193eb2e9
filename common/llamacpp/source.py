"""Where llama.cpp source comes from: a git URL at a ref, a local directory, or a tarball.

`parse_source` turns the operator's string into a spec without touching the network;
`prepare_source` makes the source available as a directory and names it (commit or digest).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llamafleet.common.digests import sha256_file
from llamafleet.common.errors import LlamafleetError, UsageError

TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar", ".zip")
_GIT_SCHEMES = ("http://", "https://", "git://", "ssh://", "file://", "git+ssh://")
_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")
# What git-check-ref-format(1) refuses (with --allow-onelevel), checked here so that parsing
# needs no git: control characters, space, ~ ^ : ? * [ \\, "..", "@{", "//".
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
# The transports a GitSource may name (see _GIT_SCHEMES); git refuses any other (ext::, fd::).
_GIT_ALLOW_PROTOCOL = "file:git:http:https:ssh"
_HASH_CHUNK = 1 << 20


class SourceError(LlamafleetError):
    """The source could not be fetched, unpacked or recognised as llama.cpp."""


@dataclass(frozen=True)
class GitSource:
    url: str
    ref: str | None  # None: the remote's default branch

    def describe(self) -> str:
        return f"{self.url}@{self.ref}" if self.ref else self.url


@dataclass(frozen=True)
class DirSource:
    path: Path

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class TarballSource:
    path: Path
    subdir: str  # "" for the archive's root (or its single top-level folder)

    def describe(self) -> str:
        return f"{self.path}:{self.subdir}" if self.subdir else str(self.path)


SourceSpec = GitSource | DirSource | TarballSource


@dataclass(frozen=True)
class PreparedSource:
    """A llama.cpp source tree on disk, and what it is."""

    spec: SourceSpec
    directory: Path
    commit: str | None  # git commit, when the source has one
    source_id: str  # the commit, or "sha256:<digest>" of the content

    @property
    def short_id(self) -> str:
        return self.source_id.removeprefix("sha256:")[:12]


def _is_git_url(text: str) -> bool:
    return text.startswith(_GIT_SCHEMES) or bool(_SCP_LIKE.match(text))


def _split_git_ref(text: str) -> tuple[str, str | None]:
    """`URL@REF` → (URL, REF); an '@' before the last '/' belongs to the URL (user@host)."""
    at = text.rfind("@")
    if at > text.rfind("/") and at > text.rfind(":"):
        url, ref = text[:at], text[at + 1 :]
        if not ref:
            raise UsageError(f"empty git ref in source '{text}'")
        return url, ref
    return text, None


def check_git_ref(ref: str) -> str:
    """`ref` if git would take it as a branch, tag or commit name, else a one-line UsageError.

    The ref reaches `git fetch` from the command line and from the agent's Build RPC: one that
    starts with '-' would be read as an option (`--upload-pack=CMD` runs CMD), so it is refused
    here, before any git runs, on top of the `--end-of-options` every git call carries.
    """
    if ref.startswith("-"):
        raise UsageError(f"git ref {ref!r} starts with '-': a ref is a branch, tag or commit name")
    parts = ref.split("/")
    if (_REF_FORBIDDEN.search(ref) or ref == "@" or ref.endswith((".", "/")) or ref.startswith("/")
            or any(part.startswith(".") or part.endswith(".lock") for part in parts)):
        raise UsageError(f"git ref {ref!r} is not a valid branch, tag or commit name (git check-ref-format)")
    return ref


def check_git_url(url: str) -> str:
    """`url` unless git could read it as an option or it holds control characters (one line)."""
    if url.startswith("-"):
        raise UsageError(f"git URL {url!r} starts with '-'")
    if re.search(r"[\x00-\x1f\x7f]", url):
        raise UsageError(f"git URL {url!r} contains control characters")
    return url


def _is_tarball_name(name: str) -> bool:
    return name.lower().endswith(TARBALL_SUFFIXES)


def parse_source(text: str) -> SourceSpec:
    """Parse `GIT_URL[@REF]`, `DIR`, or `TARBALL[:SUBDIR]` (no network, no unpacking)."""
    text = text.strip()
    if not text:
        raise UsageError("empty source: give a git URL[@REF], a directory, or a TARBALL[:SUBDIR]")
    if _is_git_url(text):
        url, ref = _split_git_ref(text)
        return GitSource(check_git_url(url), None if ref is None else check_git_ref(ref))
    path = Path(text).expanduser()
    if path.is_dir():
        return DirSource(path.resolve())
    archive, _, subdir = text.partition(":")
    # A path may itself contain ':'; prefer the longest prefix that is an existing file.
    colon = text.rfind(":")
    while colon > 0:
        candidate = Path(text[:colon]).expanduser()
        if candidate.is_file():
            archive, subdir = text[:colon], text[colon + 1 :]
            break
        colon = text.rfind(":", 0, colon)
    archive_path = Path(archive).expanduser()
    if archive_path.is_file():
        if not _is_tarball_name(archive_path.name):
            raise UsageError(
                f"unknown source kind: '{archive_path}' is a file but not an archive "
                f"({', '.join(TARBALL_SUFFIXES)})"
            )
        clean = subdir.strip("/")
        if clean and (".." in Path(clean).parts or Path(subdir).is_absolute()):
            raise UsageError(f"tarball subdirectory must be a relative path inside it: '{subdir}'")
        return TarballSource(archive_path.resolve(), clean)
    if _is_tarball_name(archive) or path.suffix:
        raise UsageError(f"source not found: no such file '{archive}'")
    raise UsageError(
        f"unknown source kind '{text}': not a git URL (https://, ssh://, file://, user@host:), "
        "an existing directory, or an existing tarball"
    )


def _run_git(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run git. Callers put `--end-of-options` before any user-given URL, ref or path."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ALLOW_PROTOCOL=_GIT_ALLOW_PROTOCOL)
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, env=env, check=False
    )


def git_commit_of(directory: Path) -> str | None:
    """The commit checked out in `directory` if it is a clean git work tree of its own."""
    if shutil.which("git") is None or not (directory / ".git").exists():
        return None
    top = _run_git(["rev-parse", "--show-toplevel"], cwd=directory)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != directory.resolve():
        return None
    head = _run_git(["rev-parse", "HEAD"], cwd=directory)
    dirty = _run_git(["status", "--porcelain", "--untracked-files=no"], cwd=directory)
    if head.returncode != 0 or dirty.returncode != 0 or dirty.stdout.strip():
        return None
    return head.stdout.strip()


def tree_digest(directory: Path) -> str:
    """sha256 over every file's relative path and content, skipping VCS and build folders."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        dirs[:] = sorted(
            d for d in dirs if d != ".git" and not (rel_root == Path(".") and d.startswith("build"))
        )
        for name in sorted(files):
            file_path = Path(root) / name
            if file_path.is_symlink() or not file_path.is_file():
                continue
            digest.update((rel_root / name).as_posix().encode() + b"\0")
            with file_path.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def require_llama_cpp_tree(directory: Path, what: str) -> None:
    if not (directory / "CMakeLists.txt").is_file():
        raise SourceError(f"{what} has no CMakeLists.txt at {directory}: not a llama.cpp source tree")
    if not (directory / "ggml").is_dir():
        raise SourceError(f"{what} has no ggml/ folder at {directory}: not a llama.cpp source tree")


def _prepare_git(spec: GitSource, sources_dir: Path) -> PreparedSource:
    if shutil.which("git") is None:
        raise SourceError("git is not installed: it is needed to fetch a git source")
    # A spec may be built without parse_source (the Build RPC's callers, tests): check it again.
    check_git_url(spec.url)
    ref = check_git_ref(spec.ref) if spec.ref else "HEAD"
    sources_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sources_dir, prefix=".fetch-") as tmp:
        work = Path(tmp) / "src"
        work.mkdir()
        # `--end-of-options` (git ≥ 2.24; rev-parse ≥ 2.30): what follows is data, never an option.
        for args in (["init", "-q"], ["remote", "add", "--end-of-options", "origin", spec.url]):
            _check_git(_run_git(args, cwd=work), f"git {args[0]}")
        fetched = _run_git(["fetch", "-q", "--depth", "1", "--end-of-options", "origin", ref], cwd=work)
        if fetched.returncode != 0:
            # Some servers refuse a shallow fetch of a bare commit id: fetch everything instead.
            full = _run_git(["fetch", "-q", "--end-of-options", "origin", "+refs/heads/*:refs/remotes/origin/*",
                             "+refs/tags/*:refs/tags/*"], cwd=work)
            if full.returncode != 0:
                raise SourceError(
                    f"cannot fetch {spec.url}: {_last_line(full.stderr or fetched.stderr)}"
                )
            resolved = _run_git(["rev-parse", "--verify", "-q", "--end-of-options", f"{ref}^{{commit}}"], cwd=work)
            if resolved.returncode != 0:
                raise SourceError(f"git ref '{ref}' does not exist in {spec.url}")
            target = resolved.stdout.strip()
        else:
            target = "FETCH_HEAD"
        # `target` is FETCH_HEAD or a full hash from rev-parse, never the user's text (and
        # checkout would take `--end-of-options` for a path).
        _check_git(_run_git(["checkout", "-q", "--detach", target], cwd=work), "git checkout")
        commit = _run_git(["rev-parse", "HEAD"], cwd=work).stdout.strip()
        final = sources_dir / f"git-{commit[:16]}"
        if not final.exists():
            os.replace(work, final)
    require_llama_cpp_tree(final, f"git source {spec.describe()}")
    return PreparedSource(spec, final, commit, commit)


def _check_git(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        raise SourceError(f"{what} failed: {_last_line(result.stderr)}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _prepare_dir(spec: DirSource) -> PreparedSource:
    require_llama_cpp_tree(spec.path, f"directory {spec.path}")
    commit = git_commit_of(spec.path)
    source_id = commit or f"sha256:{tree_digest(spec.path)}"
    return PreparedSource(spec, spec.path, commit, source_id)


def _safe_members(archive: tarfile.TarFile, prefix: str) -> list[tarfile.TarInfo]:
    members = []
    for member in archive.getmembers():
        name = member.name.removeprefix("./")
        if prefix and not (name == prefix or name.startswith(prefix + "/")):
            continue
        members.append(member)
    return members


def _extract(spec: TarballSource, dest: Path) -> None:
    """Unpack only what lies under the requested subdirectory, refusing unsafe members."""
    try:
        if spec.path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(spec.path) as archive:
                for name in archive.namelist():
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise SourceError(f"unsafe path in archive {spec.path}: '{name}'")
                    if not spec.subdir or name == spec.subdir or name.startswith(spec.subdir + "/"):
                        archive.extract(name, dest)
            return
        with tarfile.open(spec.path) as archive:
            members = _safe_members(archive, spec.subdir)
            if spec.subdir and not members:
                raise SourceError(f"tarball {spec.path} has no folder '{spec.subdir}'")
            # The 'data' filter refuses absolute paths, '..', device files and links out of dest.
            archive.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        # A corrupt archive is an operator-facing problem, not a bug: say which file.
        raise SourceError(f"cannot unpack {spec.path}: {exc}") from exc


def _prepare_tarball(spec: TarballSource, sources_dir: Path) -> PreparedSource:
    digest = sha256_file(spec.path)
    unpacked = sources_dir / f"archive-{digest[:16]}-{hashlib.sha256(spec.subdir.encode()).hexdigest()[:8]}"
    if not unpacked.exists():
        sources_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=sources_dir, prefix=".unpack-") as tmp:
            staging = Path(tmp) / "tree"
            staging.mkdir()
            _extract(spec, staging)
            os.replace(staging, unpacked)
    tree = unpacked / spec.subdir if spec.subdir else unpacked
    if not spec.subdir and not (tree / "CMakeLists.txt").exists():
        # The usual release tarball: everything inside one top folder (llama.cpp-b6000/).
        entries = list(unpacked.iterdir())
        if len(entries) == 1 and entries[0].is_dir():
            tree = entries[0]
    require_llama_cpp_tree(tree, f"tarball {spec.describe()}")
    # Vendored trees (llama-cpp-python's sdist) carry a '.git' file pointing at a parent
    # repository that is not there; git would fail on it, so it tells nothing.
    commit = git_commit_of(tree) if (tree / ".git").is_dir() else None
    source_id = commit or f"sha256:{digest}" + (f":{spec.subdir}" if spec.subdir else "")
    return PreparedSource(spec, tree, commit, source_id)


def prepare_source(spec: SourceSpec, sources_dir: Path) -> PreparedSource:
    """Make the source available as a directory under `sources_dir` (a directory is used in place)."""
    if isinstance(spec, GitSource):
        return _prepare_git(spec, sources_dir)
    if isinstance(spec, DirSource):
        return _prepare_dir(spec)
    return _prepare_tarball(spec, sources_dir)
