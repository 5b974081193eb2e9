"""The project's patches to llama.cpp (`patches/llama.cpp/NNNN-name.patch`), applied by the build.

Each patch is a unified diff (`git diff` output, paths `a/…` and `b/…` from the llama.cpp root)
preceded by a header that says what it changes, why, and the upstream thread. They apply in name
order. A build with patches records their names and sha256 in the manifest and in its key, so a
patched and a stock build of one source are two installs side by side.

The operator's source is never modified: the tree is mirrored into the build's work folder with
hard links (a copy where links are not possible), and each file a patch touches is first replaced
by a real copy of itself, so editing it cannot reach the original through the link.

Applying uses `patch` (GNU or BSD) and falls back to `git apply`; a patch that does not apply
fails the build at the step `patch`, naming the patch and the tool's first complaint.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llamafleet.common.errors import LlamafleetError

_TARGET = re.compile(r"^\+\+\+ b/(\S+)", re.MULTILINE)
_NAME = re.compile(r"^\d{4}-[a-z0-9][a-z0-9.-]*\.patch$")
# Identifies the patch that lets the coordinator use pre-computed tensor hashes (the controller
# hands them over only to a llama-server that has it).
PRECOMPUTED_HASHES_PATCH = "0002-model-loader-precomputed-rpc-hashes.patch"
# A string that patch compiles into llama-server: how a build made by hand is recognised.
HASHES_MARKER = b"LLAMA_RPC_TENSOR_HASHES"
# The rpc-server reads reference entries (`<hash>.ref`): agents pre-stage without copying.
REFERENCE_ENTRIES_PATCH = "0003-rpc-server-reference-entries.patch"
REFERENCE_MARKER = b"llama-rpc-ref 1"


class PatchError(LlamafleetError):
    """A patch file is unreadable or does not apply to the given source."""


@dataclass(frozen=True)
class Patch:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def targets(self) -> list[str]:
        """The files (relative to the llama.cpp root) the patch changes."""
        return sorted(set(_TARGET.findall(self.text)))

    def record(self) -> dict[str, str]:
        """What the manifest keeps of it."""
        return {"name": self.name, "sha256": self.sha256}


def read_patches(directory: Path) -> tuple[Patch, ...]:
    """The `NNNN-name.patch` files of `directory`, in name order."""
    try:
        names = sorted(p.name for p in directory.iterdir() if p.suffix == ".patch")
    except OSError as exc:
        raise PatchError(f"cannot list the patches in {directory}: {exc.strerror or exc}") from exc
    patches = []
    for name in names:
        if not _NAME.match(name):
            raise PatchError(f"{directory / name}: a patch is named NNNN-name.patch (lowercase)")
        try:
            text = (directory / name).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PatchError(f"cannot read {directory / name}: {exc}") from exc
        patch = Patch(name, text)
        if not patch.targets:
            raise PatchError(f"{directory / name} changes no file (no '+++ b/…' line)")
        patches.append(patch)
    return tuple(patches)


def bundled_patches() -> tuple[Patch, ...]:
    """The patch set shipped with this llamafleet (the `patches/llama.cpp` folder of the package)."""
    return read_patches(Path(str(resources.files("llamafleet.patches") / "llama.cpp")))


def patch_set_id(patches: Sequence[Patch]) -> str:
    """A short digest of the set, for the build key ("" without patches: stock keys stay as they were)."""
    if not patches:
        return ""
    joined = "\n".join(f"{p.name} {p.sha256}" for p in patches)
    return hashlib.sha256(joined.encode()).hexdigest()[:8]


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def mirror_tree(source: Path, target: Path, patches: Sequence[Patch]) -> None:
    """`target` becomes a tree of links to `source`, with every file the patches touch a real copy."""
    shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    for relative in {t for p in patches for t in p.targets}:
        path = target / relative
        if path.is_file() and not path.is_symlink():
            copy = path.with_name(path.name + ".llamafleet-copy")
            shutil.copy2(path, copy)
            os.replace(copy, path)  # the link to the original is gone; the copy took its name


def _first_complaint(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    wanted = [line for line in lines if re.search(r"fail|error|reject|can't|does not|not found", line, re.I)]
    return (wanted or lines or ["no output"])[0][:200]


def _apply_command(tree: Path, patch_path: Path, check: bool) -> list[str]:
    if shutil.which("patch"):
        command = ["patch", "-p1", "--forward", "--batch", "-d", str(tree), "-i", str(patch_path)]
        return command + (["--dry-run"] if check else [])
    if shutil.which("git"):
        return ["git", "-C", str(tree), "apply", *(["--check"] if check else []), str(patch_path)]
    raise PatchError("applying llama.cpp patches needs `patch` or `git`: install one, or build with --no-patches")


def apply_patches(tree: Path, patches: Sequence[Patch], scratch: Path) -> None:
    """Apply each patch to `tree` (a mirror from mirror_tree), checking each before it touches anything."""
    scratch.mkdir(parents=True, exist_ok=True)
    for patch in patches:
        patch_path = scratch / patch.name
        patch_path.write_text(patch.text)
        for check in (True, False):
            result = subprocess.run(_apply_command(tree, patch_path, check), capture_output=True, text=True,
                                    timeout=120, check=False)
            if result.returncode != 0:
                raise PatchError(f"patch {patch.name} does not apply to this llama.cpp source: "
                                 f"{_first_complaint(result.stdout + result.stderr)} (build with --no-patches "
                                 "to build stock llama.cpp)")
