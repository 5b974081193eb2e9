"""A GGUF header reader: metadata and the tensor index, never the tensor data.

Built for planning: it memory-maps the file, decodes only what it needs, and skips large
arrays (a 262k-token vocabulary) without building Python objects for them. Every length and
count is checked against the bytes that remain before it is used, so a truncated or hostile
file is a `GGUFError` naming the problem, never a hang or a huge allocation.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamafleet.common.errors import LlamafleetError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
# Arrays longer than this are recorded as SkippedArray (count and type), not decoded.
ARRAY_DECODE_LIMIT = 1024
# No key or string value in a real model comes near this (chat templates are tens of KiB).
MAX_STRING_BYTES = 64 * 1024 * 1024
MAX_ARRAY_DEPTH = 3

# ggml tensor types: (elements per block, bytes per block). Matches ggml.h / gguf-py.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# GGUF metadata value types → (struct format, size) for the fixed-size ones.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFError(LlamafleetError):
    """The file is not a GGUF model we can read; the message says why and where."""


@dataclass(frozen=True)
class SkippedArray:
    """A large array left undecoded: what it held and how many."""

    element_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the start of the data section
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    alignment: int = DEFAULT_ALIGNMENT
    tensors_by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """`<architecture>.<suffix>`, e.g. arch_key('block_count') → llama.block_count."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: Any, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path.name}: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes, {self.size - self.pos} remain")

    def u32(self, what: str) -> int:
        self.need(4, what)
        value = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        self.need(8, what)
        value = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return int(value)

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        if length > MAX_STRING_BYTES:
            raise self.fail(f"{what} claims {length} bytes (limit {MAX_STRING_BYTES})")
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Names and keys must be text; vocabulary pieces are skipped, never decoded here.
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Step over `count` strings without decoding them (the hot loop for vocabularies)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        for index in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"truncated: {what} ends after {index} of {count} strings")
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            raise self.fail(f"truncated: the last string of {what} runs past the end")
        self.pos = pos


def _value(cur: _Cursor, value_type: int, key: str, depth: int = 0) -> Any:
    if value_type in _SCALARS:
        fmt, size = _SCALARS[value_type]
        cur.need(size, key)
        value = struct.unpack_from(fmt, cur.buf, cur.pos)[0]
        cur.pos += size
        return value
    if value_type == _STRING:
        return cur.string(key)
    if value_type == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise cur.fail(f"{key}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        element_type = cur.u32(f"element type of {key}")
        count = cur.u64(f"length of {key}")
        if element_type in _SCALARS:
            size = _SCALARS[element_type][1]
            cur.need(count * size, f"{count} elements of {key}")
            if count > ARRAY_DECODE_LIMIT:
                cur.pos += count * size
                return SkippedArray(element_type, count)
            fmt = "<" + str(count) + _SCALARS[element_type][0][1]
            values = list(struct.unpack_from(fmt, cur.buf, cur.pos))
            cur.pos += count * size
            return values
        if element_type == _STRING:
            # Each string takes at least its 8-byte length: reject impossible counts up front.
            cur.need(count * 8, f"{count} strings of {key}")
            if count > ARRAY_DECODE_LIMIT:
                cur.skip_strings(count, key)
                return SkippedArray(element_type, count)
            return [cur.string(f"{key}[{i}]") for i in range(count)]
        if element_type == _ARRAY:
            cur.need(count * 12, f"{count} arrays of {key}")
            keep = count <= ARRAY_DECODE_LIMIT
            items = []
            for i in range(count):
                item = _value(cur, _ARRAY, f"{key}[{i}]", depth + 1)
                if keep:  # a long one is walked to find its end, not kept
                    items.append(item)
            return items if keep else SkippedArray(element_type, count)
        raise cur.fail(f"{key}: unknown array element type {element_type}")
    raise cur.fail(f"{key}: unknown value type {value_type}")


def tensor_bytes(ggml_type: int, shape: tuple[int, ...], name: str = "") -> int:
    try:
        _, block, type_size = GGML_TYPES[ggml_type]
    except KeyError:
        raise GGUFError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
    elements = 1
    for dim in shape:
        elements *= dim
    if shape and shape[0] % block:
        raise GGUFError(f"tensor {name!r}: first dimension {shape[0]} is not a multiple of the block size {block}")
    return elements // block * type_size


def _read(buf: Any, size: int, path: Path) -> GGUFHeader:
    cur = _Cursor(buf, size, path)
    cur.need(4, "magic")
    if bytes(buf[0:4]) != MAGIC:
        raise GGUFError(f"{path.name} is not a GGUF file (magic {bytes(buf[0:4])!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path.name}: GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("metadata count")
    # Each metadata entry takes at least 13 bytes, each tensor entry at least 28.
    cur.need(kv_count * 13, f"{kv_count} metadata entries")
    cur.need(tensor_count * 28, f"{tensor_count} tensor entries")
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = cur.string(f"metadata key #{index}")
        value_type = cur.u32(f"type of {key}")
        metadata[key] = _value(cur, value_type, key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path.name}: general.alignment {alignment!r} is not a power of two")
    tensors: list[TensorInfo] = []
    for index in range(tensor_count):
        name = cur.string(f"tensor name #{index}")
        n_dims = cur.u32(f"dimensions of {name}")
        if not 0 < n_dims <= GGML_MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{GGML_MAX_DIMS})")
        shape = tuple(cur.u64(f"shape of {name}") for _ in range(n_dims))
        ggml_type = cur.u32(f"type of {name}")
        offset = cur.u64(f"offset of {name}")
        tensors.append(TensorInfo(name, shape, ggml_type, offset, tensor_bytes(ggml_type, shape, name)))
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    for tensor in tensors:
        end = data_offset + tensor.offset + tensor.n_bytes
        if end > size:
            raise GGUFError(
                f"{path.name}: truncated: tensor {tensor.name!r} ends at byte {end}, the file has {size}"
            )
    return GGUFHeader(path, version, metadata, tensors, data_offset, size, alignment,
                      {t.name: t for t in tensors})


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read a GGUF file's metadata and tensor index (not its tensor data)."""
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            if size < 24:
                raise GGUFError(f"{path.name} is too short to be a GGUF file ({size} bytes)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return _read(mapped, size, path)
    except FileNotFoundError:
        raise GGUFError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise GGUFError(f"{path} is a directory, not a GGUF file") from None
    except PermissionError:
        raise GGUFError(f"cannot read {path}: permission denied") from None
