"""Turn llama.cpp source into an installed `ggml-rpc-server` + `llama-server`.

Steps, each named in progress and in errors: resolve → patch → configure → compile → install →
verify → activate. An install lives in `<state>/llama.cpp/installs/<key>/`, the key made of
the source identity (commit or content digest), a hash of the CMake flags and, for a patched
build, a digest of the patch set (patches.py); a second build with the same key builds nothing. `current` is switched (atomically, by renaming a new symlink
over it) only after the new binaries have started; a failure anywhere leaves it untouched.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.llamacpp.install import (
    LLAMA_SERVER_NAME,
    backend_names,
    RPC_SERVER_NAMES,
    InstallError,
    Manifest,
    find_binaries,
    llama_server_version,
    read_manifest,
    write_manifest,
)
from llamafleet.common.llamacpp.patches import (
    Patch,
    PatchError,
    apply_patches,
    bundled_patches,
    mirror_tree,
    patch_set_id,
)
from llamafleet.common.llamacpp.probe import ProbeError, probe_rpc_server
from llamafleet.common.llamacpp.source import (
    PreparedSource,
    SourceError,
    parse_source,
    prepare_source,
)
from llamafleet.common.process import describe_exit, line_buffered, spawn_group, stop_group

STEPS = ("resolve", "patch", "configure", "compile", "install", "verify", "activate")
# A CPU build of both targets needs about 1 GiB of objects; CUDA several times that.
MIN_FREE_BYTES_CPU = 2 * 1024**3
MIN_FREE_BYTES_CUDA = 8 * 1024**3
LOG_TAIL_LINES = 40
# Flags every build gets. Static libraries make an install a self-contained folder of two
# binaries; GGML_NATIVE=OFF keeps a build usable on any CPU of the same architecture.
BASE_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_RPC=ON",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
)
_NINJA_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_PROGRESS = re.compile(r"^\[\s*(\d+)%\]")


class BuildError(LlamafleetError):
    """A build step failed; `step` names it and `detail` holds the tail of its output."""

    def __init__(self, step: str, message: str, *, detail: str = "") -> None:
        super().__init__(f"build failed at step '{step}': {message}", detail=detail)
        self.step = step


@dataclass(frozen=True)
class BuildEvent:
    step: str
    message: str
    done: int = 0
    total: int = 0


ProgressFn = Callable[[BuildEvent], None]


@dataclass(frozen=True)
class BuildOptions:
    source: str
    state_dir: Path
    cuda: bool | None = None  # None: on when nvcc and an NVIDIA driver are both present
    cuda_architectures: str | None = None  # None: those of the GPUs present, else "native"
    jobs: int = 0  # 0: one per CPU
    patches: tuple[Patch, ...] | None = None  # None: the bundled set; () builds stock llama.cpp


@dataclass(frozen=True)
class BuildOutcome:
    manifest: Manifest
    cached: bool


@dataclass(frozen=True)
class BuildLayout:
    """Where builds live under a state directory."""

    root: Path

    @classmethod
    def under(cls, state_dir: Path) -> BuildLayout:
        return cls(state_dir / "llama.cpp")

    @property
    def sources(self) -> Path:
        return self.root / "sources"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def installs(self) -> Path:
        return self.root / "installs"

    @property
    def current(self) -> Path:
        return self.root / "current"


def nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def cuda_available() -> tuple[bool, str]:
    """Whether a CUDA build makes sense here, and why (for the progress log)."""
    if shutil.which("nvcc") is None:
        return False, "nvcc not found"
    if not nvidia_driver_present():
        return False, "nvcc found but no NVIDIA driver (/proc/driver/nvidia/version)"
    return True, "nvcc and an NVIDIA driver found"


def detect_cuda_architectures() -> str:
    """'90' for H100s, '86;89' for a 3090 and a 4090; 'native' when nvidia-smi cannot tell."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        # No usable nvidia-smi: let CMake ask the driver itself.
        return "native"
    caps = sorted({line.strip().replace(".", "") for line in result.stdout.splitlines() if line.strip()})
    return ";".join(caps) if result.returncode == 0 and caps else "native"


# CMake's CUDA_ARCHITECTURES values: native, all, all-major, or "90;86-real;89a-virtual".
_CUDA_ARCHITECTURES = re.compile(r"native|all|all-major|\d+[a-z]?(-real|-virtual)?(;\d+[a-z]?(-real|-virtual)?)*")


def check_cuda_architectures(value: str) -> str:
    """`value` if CMake reads it as CUDA architectures (it arrives from the Build RPC too)."""
    if not _CUDA_ARCHITECTURES.fullmatch(value):
        raise UsageError(f"CUDA architectures {value!r} must be native, all, all-major or a list like 86;89")
    return value


def cmake_flags(cuda: bool, cuda_architectures: str | None) -> list[str]:
    flags = list(BASE_CMAKE_FLAGS)
    if cuda:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures or 'native'}"]
    return flags


def build_key(source: PreparedSource, flags: list[str], patches: tuple[Patch, ...] = ()) -> str:
    flags_hash = hashlib.sha256(json.dumps(flags).encode()).hexdigest()[:10]
    source_hash = source.short_id if source.commit else hashlib.sha256(source.source_id.encode()).hexdigest()[:12]
    backend = "cuda" if "-DGGML_CUDA=ON" in flags else "cpu"
    key = f"{source_hash}-{backend}-{flags_hash}"
    # A stock build keeps the key it always had (installs made before patches existed stay valid).
    return f"{key}-p{patch_set_id(patches)}" if patches else key


@contextmanager
def _build_lock(layout: BuildLayout) -> Iterator[None]:
    """One build at a time per state directory (a second waits for the first)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.root / ".build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _StepRunner:
    """Runs one build's commands, logging everything to one file and keeping the tail."""

    def __init__(self, log_path: Path, progress: ProgressFn) -> None:
        self.log_path = log_path
        self.progress = progress
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)

    def run(self, step: str, argv: list[str]) -> str:
        self.progress(BuildEvent(step, " ".join(argv[:3]) + (" …" if len(argv) > 3 else "")))
        self.tail.clear()
        captured: list[str] = []
        with self.log_path.open("a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            try:
                # cmake relays ninja's output through stdio: unbuffered, progress arrives as it happens.
                proc = spawn_group(line_buffered(argv))
            except OSError as exc:
                # The tool is missing or not executable: a one-line cause, no traceback.
                raise BuildError(step, f"cannot run {argv[0]}: {exc.strerror}") from exc
            assert proc.stdout is not None
            try:
                for raw in proc.stdout:
                    line = raw.decode(errors="replace").rstrip()
                    log.write(line + "\n")
                    self.tail.append(line)
                    captured.append(line)
                    self._report(step, line)
                proc.wait()
            finally:
                # Ctrl-C or an error mid-step: the compiler's whole group goes with us.
                stop_group(proc)
        if proc.returncode != 0:
            raise BuildError(step, self._failure_cause(argv, proc.returncode), detail=self.tail_text())
        return "\n".join(captured)

    def _report(self, step: str, line: str) -> None:
        if step != "compile":
            return
        if match := _NINJA_PROGRESS.match(line):
            self.progress(BuildEvent(step, line, int(match.group(1)), int(match.group(2))))
        elif match := _MAKE_PROGRESS.match(line):
            self.progress(BuildEvent(step, line, int(match.group(1)), 100))

    def _failure_cause(self, argv: list[str], code: int) -> str:
        text = "\n".join(self.tail)
        if "No space left on device" in text:
            return f"no space left on device ({Path(argv[0]).name} {describe_exit(code)})"
        errors = [line for line in self.tail if "error" in line.lower()]
        hint = f": {errors[0].strip()[:200]}" if errors else ""
        return f"{Path(argv[0]).name} {describe_exit(code)}{hint} (full log: {self.log_path})"

    def tail_text(self) -> str:
        return "\n".join(self.tail)


def _check_disk(layout: BuildLayout, need: int) -> None:
    free = shutil.disk_usage(layout.root).free
    if free < need:
        raise BuildError(
            "resolve",
            f"not enough disk space in {layout.root}: {free / 1024**3:.1f} GiB free, "
            f"a build needs about {need / 1024**3:.0f} GiB",
        )


def _rpc_target(help_text: str) -> str:
    """Which rpc-server target this tree has: the name changed in 2025."""
    targets = set(re.findall(r"[\w.+-]+", help_text))
    for name in RPC_SERVER_NAMES:
        if name in targets:
            return name
    raise BuildError("configure", "the tree has no rpc-server target (is GGML_RPC supported here?)")


def activate(layout: BuildLayout, key: str) -> None:
    """Point `current` at installs/<key> by renaming a fresh symlink over it (atomic)."""
    link = layout.root / f".current-{os.getpid()}"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("installs") / key)
    os.replace(link, layout.current)


def current_manifest(state_dir: Path) -> Manifest | None:
    """The manifest `current` points at, or None before the first build."""
    layout = BuildLayout.under(state_dir)
    if not layout.current.exists():
        return None
    return read_manifest(layout.current.resolve())


def _existing(layout: BuildLayout, key: str) -> Manifest | None:
    directory = layout.installs / key
    if not directory.is_dir():
        return None
    try:
        manifest = read_manifest(directory)
        find_binaries(directory)
    except InstallError:
        # A damaged earlier install is rebuilt rather than trusted.
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return manifest


def run_build(options: BuildOptions, progress: ProgressFn = lambda event: None) -> BuildOutcome:
    """Build (or find already built) the install for `options`; make it `current`."""
    spec = parse_source(options.source)
    if options.cuda_architectures is not None:
        check_cuda_architectures(options.cuda_architectures)
    layout = BuildLayout.under(options.state_dir.resolve())
    with _build_lock(layout):
        progress(BuildEvent("resolve", f"preparing source {spec.describe()}"))
        try:
            source = prepare_source(spec, layout.sources)
        except OSError as exc:
            # e.g. ENOSPC while unpacking: name the step and the cause.
            raise BuildError("resolve", f"cannot prepare source: {exc.strerror or exc}") from exc
        except SourceError as exc:
            raise BuildError("resolve", exc.message) from exc
        if options.cuda is None:
            use_cuda, why = cuda_available()
        else:
            use_cuda, why = options.cuda, "requested" if options.cuda else "turned off"
        arch = options.cuda_architectures or (detect_cuda_architectures() if use_cuda else None)
        flags = cmake_flags(use_cuda, arch)
        try:
            patches = bundled_patches() if options.patches is None else options.patches
        except PatchError as exc:
            raise BuildError("patch", exc.message) from exc
        key = build_key(source, flags, patches)
        applied = ", ".join(p.name for p in patches) if patches else "none (stock llama.cpp)"
        progress(BuildEvent("resolve", f"source {source.source_id}; CUDA {'on' if use_cuda else 'off'} ({why}); "
                                       f"patches {applied}; key {key}"))
        if existing := _existing(layout, key):
            activate(layout, key)
            progress(BuildEvent("activate", f"already built: {existing.install_dir}"))
            return BuildOutcome(existing, cached=True)
        _check_disk(layout, MIN_FREE_BYTES_CUDA if use_cuda else MIN_FREE_BYTES_CPU)
        manifest = _build_new(options, layout, source, flags, key, patches, progress)
        return BuildOutcome(manifest, cached=False)


def _build_new(
    options: BuildOptions,
    layout: BuildLayout,
    source: PreparedSource,
    flags: list[str],
    key: str,
    patches: tuple[Patch, ...],
    progress: ProgressFn,
) -> Manifest:
    if shutil.which("cmake") is None:
        raise BuildError("configure", "cmake is not installed")
    work = layout.work / key
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build_dir = work / "build"
    source_dir = source.directory
    if patches:
        progress(BuildEvent("patch", f"applying {len(patches)} patch(es) to a mirror of the source"))
        source_dir = work / "source"
        try:
            mirror_tree(source.directory, source_dir, patches)
            apply_patches(source_dir, patches, work / "patches")
        except PatchError as exc:
            raise BuildError("patch", exc.message) from exc
        except OSError as exc:
            raise BuildError("patch", f"cannot mirror the source: {exc.strerror or exc}") from exc
    runner = _StepRunner(work / "build.log", progress)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    launcher = []
    if ccache := shutil.which("ccache"):
        # Speeds up rebuilds after a flag change; not part of the key (same output).
        launcher = [f"-DCMAKE_C_COMPILER_LAUNCHER={ccache}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={ccache}"]
    runner.run("configure", ["cmake", "-S", str(source_dir), "-B", str(build_dir), *generator, *flags, *launcher])
    target = _rpc_target(runner.run("configure", ["cmake", "--build", str(build_dir), "--target", "help"]))
    jobs = options.jobs or os.cpu_count() or 1
    runner.run("compile", ["cmake", "--build", str(build_dir), "--target", target, LLAMA_SERVER_NAME, "-j", str(jobs)])

    layout.installs.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=layout.installs, prefix=f".staging-{key}-"))
    try:
        progress(BuildEvent("install", f"copying binaries to {layout.installs / key}"))
        bin_dir = staging / "bin"
        bin_dir.mkdir()
        try:
            for name in (target, LLAMA_SERVER_NAME):
                shutil.copy2(build_dir / "bin" / name, bin_dir / name)
        except OSError as exc:
            cause = "no space left on device" if exc.errno == errno.ENOSPC else str(exc)
            raise BuildError("install", cause) from exc
        shutil.copy2(work / "build.log", staging / "build.log")

        progress(BuildEvent("verify", "starting the new binaries"))
        try:
            version = llama_server_version(bin_dir / LLAMA_SERVER_NAME)
            banner = probe_rpc_server(bin_dir / target)
        except (InstallError, ProbeError) as exc:
            raise BuildError("verify", exc.message, detail=exc.detail) from exc
        if ("-DGGML_CUDA=ON" in flags and nvidia_driver_present()
                and not any(d.name.startswith("CUDA") for d in banner.devices)):
            # A CUDA build that sees no GPU where the driver is present would silently run on CPU.
            raise BuildError("verify", "built with CUDA, but the rpc-server lists no CUDA device: "
                             + ", ".join(d.name for d in banner.devices))
        final = layout.installs / key
        manifest = Manifest(
            key=key,
            commit=source.commit,
            source_id=source.source_id,
            source=source.spec.describe(),
            cmake_flags=flags,
            backends=backend_names(banner, cuda="-DGGML_CUDA=ON" in flags),
            rpc_server=str(final / "bin" / target),
            llama_server=str(final / "bin" / LLAMA_SERVER_NAME),
            rpc_protocol_version=banner.protocol_version,
            version=version,
            built_at_unix_ms=int(time.time() * 1000),
            patches=[p.record() for p in patches],
        )
        write_manifest(staging, manifest)
        os.replace(staging, final)
    except BaseException:
        # Whatever stopped us (a failed step, Ctrl-C), nothing half-installed stays behind.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(BuildEvent("activate", f"switching current to {key}"))
    activate(layout, key)
    shutil.rmtree(work, ignore_errors=True)
    return manifest
