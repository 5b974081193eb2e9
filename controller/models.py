"""Model names → GGUF files: the models directory, explicit entries, and local Ollama stores.

Names are parsed strictly before any path is built: no traversal, no absolute paths, no NUL,
bounded length, digests checked, and every file opened lies inside the store it came from.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llamafleet.common.errors import LlamafleetError, UsageError

MAX_NAME_LENGTH = 200
MAX_MANIFEST_BYTES = 1024 * 1024
MODEL_LAYER = "application/vnd.ollama.image.model"
DEFAULT_REGISTRY = "registry.ollama.ai"
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ModelNotFound(LlamafleetError):
    """No store has a model of that name."""


class InvalidModelName(UsageError):
    """The name is not one we accept (and no path was built from it)."""


@dataclass(frozen=True)
class ModelName:
    """`[host/][namespace/]model[:tag]`, Ollama's grammar."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def short(self) -> str:
        prefix = "" if self.namespace == "library" else f"{self.namespace}/"
        return f"{prefix}{self.model}:{self.tag}"


def parse_model_name(text: str) -> ModelName:
    if not isinstance(text, str) or not text:
        raise InvalidModelName("model name is empty")
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidModelName(f"model name is longer than {MAX_NAME_LENGTH} characters")
    if "\0" in text or "\\" in text or text.startswith("/"):
        raise InvalidModelName(f"model name {text!r} contains a character that is not allowed")
    path, colon, tag = text.partition(":")
    if colon and not tag:
        raise InvalidModelName(f"invalid model name {text!r}: empty tag after ':'")
    tag = tag or "latest"
    parts = path.split("/")
    if len(parts) > 3 or not all(_SEGMENT.match(p) for p in parts) or not _TAG.match(tag):
        raise InvalidModelName(
            f"invalid model name {text!r}: use [namespace/]model[:tag] with letters, digits, '.', '_', '-'"
        )
    if any(p in (".", "..") or ".." in p for p in parts) or ".." in tag:
        raise InvalidModelName(f"invalid model name {text!r}: '..' is not allowed")
    host = parts[0] if len(parts) == 3 else DEFAULT_REGISTRY
    namespace = parts[-2] if len(parts) >= 2 else "library"
    return ModelName(host, namespace, parts[-1], tag)


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    source: str  # "explicit", "models-dir" or "ollama:<store>"


def default_ollama_stores(environ: dict[str, str] | None = None) -> list[Path]:
    env = os.environ if environ is None else environ
    candidates = [Path(env["OLLAMA_MODELS"])] if env.get("OLLAMA_MODELS") else []
    candidates += [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]
    return [c for c in candidates if (c / "manifests").is_dir()]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


class ModelStore:
    def __init__(self, models_dir: Path | None = None, explicit: dict[str, Path] | None = None,
                 ollama_stores: list[Path] | None = None) -> None:
        self.models_dir = models_dir.absolute() if models_dir else None
        self.explicit = dict(explicit or {})
        self.ollama_stores = list(ollama_stores or [])
        for name in self.explicit:
            parse_model_name(name)

    def resolve(self, text: str) -> ResolvedModel:
        name = parse_model_name(text)
        for key in (text, name.short, f"{name.model}:{name.tag}", name.model):
            if key in self.explicit:
                return ResolvedModel(text, self.explicit[key], "explicit")
        if self.models_dir is not None and name.namespace == "library" and name.tag == "latest":
            # The name grammar already rules out traversal; a symlink the operator put into
            # their models directory is their choice and is followed.
            candidate = self.models_dir / f"{name.model}.gguf"
            if candidate.is_file():
                return ResolvedModel(text, candidate, "models-dir")
        for store in self.ollama_stores:
            if (found := self._from_ollama(store, name)) is not None:
                return ResolvedModel(text, found, f"ollama:{store}")
        raise ModelNotFound(f"model '{text}' not found (looked in {self._where()})")

    def _where(self) -> str:
        places = []
        if self.explicit:
            places.append("--model entries")
        if self.models_dir is not None:
            places.append(str(self.models_dir))
        places += [f"Ollama store {s}" for s in self.ollama_stores]
        return ", ".join(places) or "no model stores are configured"

    @staticmethod
    def _from_ollama(store: Path, name: ModelName) -> Path | None:
        manifest = store / "manifests" / name.host / name.namespace / name.model / name.tag
        if not manifest.is_file() or not _inside(manifest, store):
            return None
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            raise ModelNotFound(f"manifest of '{name.short}' in {store} is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            layers = json.loads(manifest.read_text())["layers"]
            digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, StopIteration):
            # A damaged manifest is the store's problem; name it instead of crashing.
            raise ModelNotFound(f"manifest of '{name.short}' in {store} has no readable model layer") from None
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise ModelNotFound(f"manifest of '{name.short}' in {store} has an invalid digest {digest!r}")
        blob = store / "blobs" / digest.replace(":", "-")
        if not blob.is_file() or not _inside(blob, store):
            raise ModelNotFound(f"model '{name.short}': blob {digest} is missing from {store}")
        return blob

    def list(self) -> list[ResolvedModel]:
        found = [ResolvedModel(n, p, "explicit") for n, p in sorted(self.explicit.items())]
        if self.models_dir is not None and self.models_dir.is_dir():
            for path in sorted(self.models_dir.glob("*.gguf")):
                if _SEGMENT.match(path.stem):
                    found.append(ResolvedModel(path.stem, path, "models-dir"))
        for store in self.ollama_stores:
            root = store / "manifests"
            for manifest in sorted(root.glob("*/*/*/*")):
                host, namespace, model, tag = manifest.relative_to(root).parts
                text = f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
                try:
                    found.append(self.resolve(text) if host == DEFAULT_REGISTRY else self.resolve(f"{host}/{namespace}/{model}:{tag}"))
                except LlamafleetError:
                    # One broken entry must not hide the others from a listing.
                    continue
        return found


def parse_model_entries(entries: tuple[str, ...]) -> dict[str, Path]:
    """`NAME=PATH` entries from flags or config."""
    out = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not path:
            raise UsageError(f"--model takes NAME=PATH, not {entry!r}")
        parse_model_name(name)
        out[name] = Path(path).expanduser()
    return out
