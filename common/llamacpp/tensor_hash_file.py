"""The file the patched llama-server reads from $LLAMA_RPC_TENSOR_HASHES (patches/llama.cpp/0002).

    llama-rpc-tensor-hashes 1
    <model file size> <model file mtime_ns>
    <absolute file offset> <size> <FNV-1a, 16 hex digits>      one line per weight tensor

llama.cpp compares the second line with the file it maps and ignores the rest when they differ,
so a hash file never names the bytes of another file version: at worst the load hashes as a stock
one would. The controller writes one per model file (controller/tensor_hashes.py); an agent that
runs a coordinator writes the controller's values under its own copy's identity (the copies are
the same bytes: the agent checked their sha256).
"""

from __future__ import annotations

from collections.abc import Iterable

from llamafleet.common.digests import FileKey

FORMAT_LINE = "llama-rpc-tensor-hashes 1"


def parse(text: str) -> dict[tuple[int, int], int]:
    """The tensor lines of a hash file (the header lines are llama.cpp's to check)."""
    values = {}
    for line in text.splitlines()[2:]:
        offset, size, value = line.split()
        values[(int(offset), int(size))] = int(value, 16)
    return values


def render(key: FileKey, ranges: Iterable[tuple[int, int, int]]) -> str:
    """The file llama.cpp reads: the header line, the model's identity, then offset size hash per tensor."""
    lines = [f"{FORMAT_LINE}", f"{key.size} {key.mtime_ns}"]
    lines += [f"{offset} {size} {value:016x}" for offset, size, value in ranges]
    return "\n".join(lines) + "\n"
