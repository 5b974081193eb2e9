"""How much memory a model needs on the workers, in parts, read from its GGUF header.

llama.cpp with every layer offloaded over RPC puts:
- each repeating layer (`blk.N.*`) and its slice of the KV cache on the device the split gives it;
- the output layer (`output.weight`, `output_norm.weight`; or a duplicate of `token_embd.weight`
  when the model ties them) on the last device;
- the token embeddings on the coordinator host (not on any worker);
- a compute buffer on every device.
So an even layer count is not an even byte split: placement works from these parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.gguf import GGUFHeader

_BLOCK = re.compile(r"^blk\.(\d+)\.")
KV_CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
DEFAULT_UBATCH = 512
# What every backend's compute buffer needs beyond the per-token work (graph, scratch).
COMPUTE_BASE_BYTES = 32 * 1024 * 1024


class EstimateError(LlamafleetError):
    """The model's header lacks what the estimate needs."""


@dataclass(frozen=True)
class MemoryEstimate:
    architecture: str
    n_layers: int
    ctx_per_slot: int
    parallel: int
    cache_type: str
    layer_weight_bytes: tuple[int, ...]  # one per repeating layer
    kv_bytes_per_layer: tuple[int, ...]  # the whole KV cache (all slots) of each layer
    output_bytes: int  # on the last device
    output_tied: bool  # output layer duplicates token_embd
    token_embd_bytes: int  # on the coordinator host
    host_other_bytes: int  # other tensors outside the blocks, kept on the host
    compute_bytes_per_device: int
    compute_bytes_output_device: int  # extra on the last device (logits)

    def layer_bytes(self, index: int) -> int:
        return self.layer_weight_bytes[index] + self.kv_bytes_per_layer[index]

    @property
    def layers_total(self) -> int:
        return sum(self.layer_weight_bytes) + sum(self.kv_bytes_per_layer)

    @property
    def device_total(self) -> int:
        """Everything the workers hold together, with one device's compute allowance."""
        return self.layers_total + self.output_bytes + self.compute_bytes_per_device + self.compute_bytes_output_device

    def parts(self) -> dict[str, int]:
        return {
            "layer_weights": sum(self.layer_weight_bytes),
            "kv_cache": sum(self.kv_bytes_per_layer),
            "output_layer": self.output_bytes,
            "compute_per_device": self.compute_bytes_per_device,
            "compute_output_device": self.compute_bytes_output_device,
            "host_token_embeddings": self.token_embd_bytes,
            "host_other": self.host_other_bytes,
        }


def _int_key(header: GGUFHeader, suffix: str, default: int | None = None) -> int:
    value = header.arch_key(suffix, default)
    if isinstance(value, list):  # per-layer values (e.g. head_count_kv): the largest is the bound
        value = max(value) if value else default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EstimateError(f"{header.path.name}: {header.architecture}.{suffix} is missing or not a count ({value!r})")
    return value


def _per_layer(header: GGUFHeader, suffix: str, n_layers: int, default: int) -> list[int]:
    value = header.arch_key(suffix, default)
    if isinstance(value, list) and len(value) == n_layers and all(isinstance(v, int) for v in value):
        return list(value)
    return [_int_key(header, suffix, default)] * n_layers


def estimate_memory(header: GGUFHeader, ctx: int, parallel: int = 1, cache_type: str = "f16",
                    ubatch: int = DEFAULT_UBATCH) -> MemoryEstimate:
    if not header.architecture:
        raise EstimateError(f"{header.path.name}: no general.architecture in the header")
    if ctx <= 0 or parallel <= 0:
        raise EstimateError(f"context ({ctx}) and parallel slots ({parallel}) must be positive")
    if cache_type not in KV_CACHE_TYPE_BYTES:
        raise EstimateError(f"unknown KV cache type {cache_type!r} (known: {', '.join(KV_CACHE_TYPE_BYTES)})")
    n_layers = _int_key(header, "block_count")
    n_embd = _int_key(header, "embedding_length")
    n_head = _int_key(header, "attention.head_count", 1) or 1
    n_ff = _int_key(header, "feed_forward_length", 4 * n_embd)
    head_kv = _per_layer(header, "attention.head_count_kv", n_layers, n_head)
    key_len = _int_key(header, "attention.key_length", n_embd // n_head)
    value_len = _int_key(header, "attention.value_length", n_embd // n_head)

    layer_weights = [0] * n_layers
    output = token_embd = other = 0
    has_output = False
    for tensor in header.tensors:
        if match := _BLOCK.match(tensor.name):
            index = int(match.group(1))
            if index >= n_layers:
                raise EstimateError(f"{header.path.name}: tensor {tensor.name} is beyond block_count {n_layers}")
            layer_weights[index] += tensor.n_bytes
        elif tensor.name.startswith("output"):
            output += tensor.n_bytes
            has_output = has_output or tensor.name == "output.weight"
        elif tensor.name == "token_embd.weight":
            token_embd = tensor.n_bytes
        else:
            other += tensor.n_bytes
    if not has_output:
        # Tied embeddings: llama.cpp loads token_embd a second time as the output layer.
        output += token_embd

    per_cell = KV_CACHE_TYPE_BYTES[cache_type]
    cells = ctx * parallel
    kv = tuple(int(cells * h * (key_len + value_len) * per_cell) for h in head_kv)
    compute = COMPUTE_BASE_BYTES + ubatch * 4 * (4 * n_embd + 2 * n_ff)
    vocab = header.get("tokenizer.ggml.tokens")
    n_vocab = getattr(vocab, "count", None) or (len(vocab) if isinstance(vocab, list) else 0)
    return MemoryEstimate(
        architecture=header.architecture, n_layers=n_layers, ctx_per_slot=ctx, parallel=parallel,
        cache_type=cache_type, layer_weight_bytes=tuple(layer_weights), kv_bytes_per_layer=kv,
        output_bytes=output, output_tied=not has_output, token_embd_bytes=token_embd, host_other_bytes=other,
        compute_bytes_per_device=compute, compute_bytes_output_device=n_vocab * parallel * 4,
    )
