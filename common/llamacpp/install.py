"""An installed llama.cpp: its binaries and the manifest that says what they are.

Built installs live in `<state>/llama.cpp/installs/<key>/` with a `manifest.json`; the
`current` link beside `installs/` names the one in use. An operator's own install can be
adopted instead (`--llama-cpp DIR`): its binaries are found and probed, nothing is written there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llamafleet.common.errors import LlamafleetError
from llamafleet.common.llamacpp.banner import RpcBanner
from llamafleet.common.llamacpp.patches import (
    HASHES_MARKER,
    PRECOMPUTED_HASHES_PATCH,
    REFERENCE_ENTRIES_PATCH,
    REFERENCE_MARKER,
)
from llamafleet.common.llamacpp.probe import probe_rpc_server

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
# Current llama.cpp names the target ggml-rpc-server; trees before mid-2025 call it rpc-server.
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")
LLAMA_SERVER_NAME = "llama-server"


class InstallError(LlamafleetError):
    """No usable llama.cpp install where one was expected."""


@dataclass(frozen=True)
class Manifest:
    """What a build produced. Written once, after the binaries were seen to start."""

    key: str
    commit: str | None
    source_id: str
    source: str
    cmake_flags: list[str]
    backends: list[str]
    rpc_server: str  # absolute path
    llama_server: str  # absolute path
    rpc_protocol_version: str
    version: str  # first line of `llama-server --version`
    built_at_unix_ms: int
    adopted: bool = False
    schema: int = MANIFEST_SCHEMA
    # The llama.cpp patches built in ({"name", "sha256"}, in order); empty for stock llama.cpp.
    patches: list[dict[str, str]] = field(default_factory=list)

    @property
    def patch_names(self) -> list[str]:
        return [p.get("name", "") for p in self.patches]

    @property
    def install_dir(self) -> Path:
        return Path(self.rpc_server).parent.parent

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Manifest:
        if data.get("schema") != MANIFEST_SCHEMA:
            raise InstallError(f"unsupported manifest schema {data.get('schema')!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise InstallError(f"manifest has unknown fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**data)  # type: ignore[arg-type]
        except TypeError as exc:
            # A missing field means a hand-edited or truncated file: say so in one line.
            raise InstallError(f"manifest is incomplete: {exc}") from exc


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    target = directory / MANIFEST_NAME
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".manifest-", delete=False) as tmp:
        tmp.write(manifest.to_json())
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, target)
    return target


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InstallError(f"no {MANIFEST_NAME} in {directory}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # A corrupt manifest must not take the agent down with a traceback.
        raise InstallError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InstallError(f"{path} does not hold a JSON object")
    return Manifest.from_dict(data)


def find_binaries(directory: Path) -> tuple[Path, Path]:
    """(rpc-server, llama-server) in DIR, DIR/bin or DIR/build/bin (an install or a build tree)."""
    for candidate in (directory, directory / "bin", directory / "build" / "bin"):
        llama_server = candidate / LLAMA_SERVER_NAME
        for name in RPC_SERVER_NAMES:
            rpc_server = candidate / name
            if _is_executable(rpc_server) and _is_executable(llama_server):
                return rpc_server, llama_server
    raise InstallError(
        f"no llama.cpp binaries in {directory}: expected {' or '.join(RPC_SERVER_NAMES)} and "
        f"{LLAMA_SERVER_NAME} in it, its bin/ or its build/bin/"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def llama_server_version(llama_server: Path, timeout_s: float = 30.0) -> str:
    """First line of `llama-server --version` (it prints to stderr), e.g. 'version: 1 (abc123)'."""
    try:
        result = subprocess.run(
            [str(llama_server), "--version"], capture_output=True, text=True, timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        # The binary is unusable; the caller turns this into "does not start".
        raise InstallError(f"{llama_server} --version did not run: {exc}") from exc
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        tail = "; ".join(lines[-3:]) or "no output"
        raise InstallError(f"{llama_server} --version exited with code {result.returncode}: {tail}")
    version_lines = [line for line in lines if line.startswith("version:")]
    return (version_lines or lines)[0].strip()


def backend_names(banner: RpcBanner, *, cuda: bool) -> list[str]:
    """Backends an install offers: its rpc-server's device kinds (CPU, CUDA0 → CUDA), RPC, CUDA if built in."""
    found = {device.name.rstrip("0123456789") for device in banner.devices} | {"RPC"}
    if cuda:
        found.add("CUDA")
    return sorted(found)


def binary_mentions(binary: Path, marker: bytes, chunk: int = 8 * 1024 * 1024) -> bool:
    """Whether `marker` occurs in the file (a string constant compiled in): a read, nothing run."""
    tail = b""
    try:
        with binary.open("rb") as handle:
            while block := handle.read(chunk):
                if marker in tail + block:
                    return True
                tail = block[-len(marker):]
    except OSError:
        return False
    return False


def adopt_install(directory: Path) -> Manifest:
    """Describe an operator's existing llama.cpp install (probed, nothing written there).

    A llamafleet install (with its manifest) keeps what the manifest says it is.
    """
    rpc_server, llama_server = find_binaries(directory)
    if (directory / MANIFEST_NAME).is_file():
        return dataclasses.replace(read_manifest(directory), adopted=True)
    banner = probe_rpc_server(rpc_server)
    # A build of our patched tree made by hand: its llama-server reads pre-computed hashes.
    # (sha256 "": recognised by a string compiled in, not recorded by a llamafleet build).
    found = [{"name": name, "sha256": ""} for name, binary, marker in (
        (PRECOMPUTED_HASHES_PATCH, llama_server, HASHES_MARKER), (REFERENCE_ENTRIES_PATCH, rpc_server, REFERENCE_MARKER))
        if binary_mentions(binary, marker)]
    return Manifest(
        key="adopted", commit=None, source_id=f"adopted:{directory}", source=str(directory),
        cmake_flags=[], backends=backend_names(banner, cuda=False),
        rpc_server=str(rpc_server), llama_server=str(llama_server),
        rpc_protocol_version=banner.protocol_version, version=llama_server_version(llama_server),
        built_at_unix_ms=0, adopted=True, patches=found,
    )
