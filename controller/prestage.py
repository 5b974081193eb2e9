"""Which bytes of a model each node of a plan will hold: the ranges its agent pre-stages.

llama.cpp puts the layers of `--tensor-split` on the devices in order (the plan's
`first_layer`/`layer_count` per device) and the output layer on the last device: `output.weight`,
or with tied embeddings a second copy of `token_embd.weight`, plus `output_norm.weight`. The
token embeddings themselves stay on the coordinator's host and never reach an rpc-server.

Only tensors above llama.cpp's hash threshold (10 MiB, strictly greater) are sent: smaller ones
always travel with the load, so asking for them would only cost the agent a read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llamafleet.controller.gguf import GGUFHeader, TensorInfo
from llamafleet.controller.placement.plan import DeviceAssignment

HASH_THRESHOLD = 10 * 1024 * 1024  # llama.cpp's ggml-rpc.cpp, protocol 7
_LAYER = re.compile(r"^blk\.(\d+)\.")


def output_tensors(header: GGUFHeader) -> list[TensorInfo]:
    """What the output device holds besides its layers."""
    by_name = {t.name: t for t in header.tensors}
    out = [t for t in header.tensors if t.name.startswith(("output.", "output_norm."))]
    if "output.weight" not in by_name and "token_embd.weight" in by_name:
        out.append(by_name["token_embd.weight"])  # tied: the loader copies it onto the output device
    return out


def share_tensors(header: GGUFHeader, assignments: Sequence[DeviceAssignment], last: DeviceAssignment,
                  threshold: int = HASH_THRESHOLD) -> list[TensorInfo]:
    """The tensors above `threshold` that `assignments` (one node's devices) hold; `last` is the plan's last device."""
    layers: set[int] = set()
    for a in assignments:
        layers.update(range(a.first_layer, a.first_layer + a.layer_count))
    chosen = [t for t in header.tensors if (m := _LAYER.match(t.name)) and int(m.group(1)) in layers]
    if any(a is last for a in assignments):
        chosen += output_tensors(header)
    return [t for t in chosen if t.n_bytes > threshold]


def node_ranges(header: GGUFHeader, assignments: Sequence[DeviceAssignment],
                threshold: int = HASH_THRESHOLD) -> dict[str, list[tuple[int, int]]]:
    """Per node of a plan: (absolute file offset, size) of every tensor it will be sent, each once."""
    if not assignments:
        return {}
    last = assignments[-1]
    out: dict[str, list[tuple[int, int]]] = {}
    for node in dict.fromkeys(a.node for a in assignments):
        mine = [a for a in assignments if a.node == node]
        ranges = [(header.data_offset + t.offset, t.n_bytes) for t in share_tensors(header, mine, last, threshold)]
        if ranges:
            out[node] = list(dict.fromkeys(ranges))
    return out


def every_large_tensor(header: GGUFHeader, threshold: int = HASH_THRESHOLD) -> list[tuple[int, int]]:
    """(absolute file offset, size) of every tensor above `threshold`, each once, in file order.

    What a node that has just pulled the file stages in the background: whatever share a later
    placement (a failover) gives it, its entries are then in its cache already."""
    return sorted({(header.data_offset + t.offset, t.n_bytes) for t in header.tensors if t.n_bytes > threshold})
