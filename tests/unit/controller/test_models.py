from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamafleet.controller.models import (
    InvalidModelName,
    ModelName,
    ModelNotFound,
    ModelStore,
    parse_model_entries,
    parse_model_name,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gemma3", ModelName("registry.ollama.ai", "library", "gemma3", "latest")),
        ("gemma3:270m", ModelName("registry.ollama.ai", "library", "gemma3", "270m")),
        ("someone/model:q4_K_M", ModelName("registry.ollama.ai", "someone", "model", "q4_K_M")),
        ("hf.co/org/model:Q8_0", ModelName("hf.co", "org", "model", "Q8_0")),
    ],
)
def test_names(text: str, expected: ModelName) -> None:
    assert parse_model_name(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "../etc/passwd", "/abs/model", "a/../b", "..", "model:..", "x\0y", "a" * 201, "a/b/c/d",
     "model:", "mo del", "model:tag/extra", "..hidden", "a\\b", "model:.."],
)
def test_bad_names_are_refused_before_any_path_is_built(text: str) -> None:
    with pytest.raises(InvalidModelName):
        parse_model_name(text)


def _ollama_store(root: Path, name: str = "gemma3", tag: str = "latest", digest: str = DIGEST,
                  namespace: str = "library", write_blob: bool = True) -> Path:
    manifest = root / "manifests" / "registry.ollama.ai" / namespace / name / tag
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "00" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 4},
    ]}))
    (root / "blobs").mkdir(exist_ok=True)
    if write_blob:
        (root / "blobs" / digest.replace(":", "-")).write_bytes(b"GGUF")
    return root


def test_resolution_order_explicit_then_models_dir_then_ollama(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "gemma3.gguf").write_bytes(b"GGUF")
    store = _ollama_store(tmp_path / "ollama")
    explicit = tmp_path / "x.gguf"
    explicit.write_bytes(b"GGUF")
    assert ModelStore(models_dir, {"gemma3": explicit}, [store]).resolve("gemma3").source == "explicit"
    assert ModelStore(models_dir, {}, [store]).resolve("gemma3").path == models_dir / "gemma3.gguf"
    resolved = ModelStore(None, {}, [store]).resolve("gemma3:latest")
    assert resolved.path == store / "blobs" / DIGEST.replace(":", "-") and resolved.source.startswith("ollama:")


def test_namespaced_ollama_model(tmp_path: Path) -> None:
    store = _ollama_store(tmp_path / "ollama", name="m", tag="q4", namespace="someone")
    assert ModelStore(None, {}, [store]).resolve("someone/m:q4").path.name == DIGEST.replace(":", "-")


def test_unknown_model_lists_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"model 'nope' not found \(looked in .*models"):
        ModelStore(tmp_path / "models", {}, []).resolve("nope")


@pytest.mark.parametrize("digest", ["sha256:xyz", "md5:" + "a" * 32, "sha256:../../etc/passwd", ""])
def test_bad_digests_are_refused(tmp_path: Path, digest: str) -> None:
    store = _ollama_store(tmp_path / "ollama", digest=digest, write_blob=False)
    with pytest.raises(ModelNotFound, match="invalid digest"):
        ModelStore(None, {}, [store]).resolve("gemma3")


def test_missing_blob(tmp_path: Path) -> None:
    store = _ollama_store(tmp_path / "ollama", write_blob=False)
    with pytest.raises(ModelNotFound, match="is missing"):
        ModelStore(None, {}, [store]).resolve("gemma3")


def test_corrupt_manifest(tmp_path: Path) -> None:
    store = _ollama_store(tmp_path / "ollama")
    (store / "manifests" / "registry.ollama.ai" / "library" / "gemma3" / "latest").write_text("{nope")
    with pytest.raises(ModelNotFound, match="no readable model layer"):
        ModelStore(None, {}, [store]).resolve("gemma3")


def test_operator_symlinks_in_the_models_dir_are_followed(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    elsewhere = tmp_path / "disk2" / "big.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"GGUF")
    (models_dir / "big.gguf").symlink_to(elsewhere)
    assert ModelStore(models_dir, {}, []).resolve("big").path == models_dir / "big.gguf"


def test_ollama_blob_linked_out_of_the_store_is_refused(tmp_path: Path) -> None:
    store = _ollama_store(tmp_path / "ollama", write_blob=False)
    outside = tmp_path / "secret"
    outside.write_bytes(b"GGUF")
    (store / "blobs" / DIGEST.replace(":", "-")).symlink_to(outside)
    with pytest.raises(ModelNotFound, match="is missing"):
        ModelStore(None, {}, [store]).resolve("gemma3")


def test_listing(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "a.gguf").write_bytes(b"GGUF")
    store = _ollama_store(tmp_path / "ollama")
    names = [m.name for m in ModelStore(models_dir, {}, [store]).list()]
    assert names == ["a", "gemma3:latest"]


def test_model_entries() -> None:
    assert parse_model_entries(("big=/srv/big.gguf",)) == {"big": Path("/srv/big.gguf")}
    with pytest.raises(Exception, match="NAME=PATH"):
        parse_model_entries(("nopath",))
