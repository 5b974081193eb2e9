"""What the API says about a model file: Ollama's `details`, `model_info`, template, capabilities.

Read from the GGUF header (our own reader: fast and safe on hostile files) and cached by
path, size and mtime, so listing many models stays cheap.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llamafleet.controller.chat_template import CHAT_TEMPLATE_KEY, template_capabilities
from llamafleet.controller.gguf import GGUFHeader, SkippedArray, read_gguf_header
from llamafleet.controller.models import ResolvedModel

# llama.cpp's llama_ftype, the value of `general.file_type`.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}
_OLLAMA_BLOB = re.compile(r"^sha256-([0-9a-f]{64})$")
MAX_INFO_STRING = 1024


@dataclass(frozen=True)
class ModelCard:
    name: str
    path: Path
    size: int
    modified_at: str  # RFC 3339
    digest: str  # the Ollama blob's sha256, or "" when the file is not an Ollama blob
    details: dict[str, Any]
    model_info: dict[str, Any]
    template: str
    capabilities: list[str]
    parameters: int


def rfc3339(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat().replace("+00:00", "Z")


def parameter_label(count: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            value = count / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(count)


def _info_value(value: Any) -> Any:
    """Scalars as they are; long strings and arrays shortened (Ollama leaves out token lists too)."""
    if isinstance(value, SkippedArray) or isinstance(value, list):
        return None
    if isinstance(value, str) and len(value) > MAX_INFO_STRING:
        return None
    return value


def card_from_header(model: ResolvedModel, header: GGUFHeader, mtime: float) -> ModelCard:
    arch = header.architecture
    parameters = sum(_elements(t.shape) for t in header.tensors)
    file_type = header.get("general.file_type")
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else [],
        "parameter_size": str(header.get("general.size_label") or parameter_label(parameters)),
        "quantization_level": FILE_TYPES.get(file_type, str(file_type)) if file_type is not None else "unknown",
    }
    info = {k: v for k, v in ((k, _info_value(v)) for k, v in header.metadata.items()) if v is not None}
    info["general.parameter_count"] = parameters
    capabilities = ["embedding"] if header.arch_key("pooling_type") is not None else ["completion"]
    # Never `vision`: the gateway takes no images. `tools`/`thinking`: what the template renders.
    capabilities += template_capabilities(str(header.get(CHAT_TEMPLATE_KEY) or ""))
    match = _OLLAMA_BLOB.match(model.path.name)
    return ModelCard(
        name=model.name, path=model.path, size=header.file_size, modified_at=rfc3339(mtime),
        digest=match.group(1) if match else "", details=details, model_info=info,
        template=str(header.get("tokenizer.chat_template") or ""), capabilities=capabilities, parameters=parameters,
    )


def _elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Catalog:
    def __init__(self) -> None:
        self._cards: dict[tuple[Path, int, int], ModelCard] = {}

    def card(self, model: ResolvedModel) -> ModelCard:
        stat = model.path.stat()
        key = (model.path, stat.st_size, stat.st_mtime_ns)
        card = self._cards.get(key)
        if card is None:
            card = card_from_header(model, read_gguf_header(model.path), stat.st_mtime)
            self._cards[key] = card
        return card if card.name == model.name else replace(card, name=model.name)
