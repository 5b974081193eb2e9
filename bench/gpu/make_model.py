"""Write a llama-shaped GGUF with real (random) weights that llama.cpp loads and runs.

The weights' values do not change the speed of a dense model, only its shape and tensor types
do, so an "8B" file here runs at the speed of a real Llama-3-8B of the same quantisation. Every
block holds a finite scale and random codes (no NaN or Inf), chosen so that activations stay in
range through the layers.

The vocabulary is a SentencePiece-style one that llama.cpp's tokenizer accepts: `<unk>`, `<s>`,
`</s>`, the 128 ASCII byte tokens, the characters `▁ t 0-9`, and `▁t<N>` for every remaining id.
A prompt of words `t17 t4242 …` therefore tokenizes to exactly one token per word (plus BOS),
which is how the benchmarks build a prompt of an exact length. Generated text is plain ASCII.

No two tensors hold the same bytes: each one starts at its own block of the random pool. Equal
tensors would share one rpc tensor cache entry (its key is the FNV-1a of the bytes), and a load
with an empty cache would then send each distinct tensor once, not every tensor.

    python bench/gpu/make_model.py --shape llama-8b --type q8_0 --out /dev/shm/llama-8b-q8_0.gguf

Nothing here is imported by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

# The shapes are the test fixtures' (one definition of a llama-family shape in the repository).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.fixtures.synthetic_gguf import LLAMA_8B, Shape  # noqa: E402

ALIGNMENT = 32
# Pool of random blocks written over and over; 1 Mi blocks of Q8_0 is 34 MiB.
POOL_BLOCKS = 1 << 20
# Tensor #i starts at pool block i * START_STRIDE (mod POOL_BLOCKS): odd, so no two of the first
# POOL_BLOCKS tensors start at the same block.
START_STRIDE = 7919


SHAPES = {
    s.name: s
    for s in (
        LLAMA_8B,
        # For trying the scripts out on a CPU: they load in a second.
        Shape("llama-tiny", 4, 256, 512, 4, 2, 2048),
        Shape("llama-small", 8, 1024, 2816, 8, 2, 8192),
        # About 2.1 GB in Q8_0 for the CPU load benchmarks (bench/load_speed.py): 2.06 GB of it
        # above llama.cpp's 10 MiB hash threshold (attn_k/attn_v, 4.5 MB each, always travel).
        Shape("llama-2g", 8, 4096, 14336, 32, 8, 32000),
        # 1.14 GB at Q8_0 whose every matrix is above the rpc tensor cache's 10 MiB threshold
        # (17.8 MB attention, 47.9 MB feed-forward, 139 MB output), for the pre-staging benchmarks.
        Shape("llama-1g", 4, 4096, 11008, 32, 32, 32000),
    )
}
TYPES = {
    "q8_0": (GGMLQuantizationType.Q8_0, 7),  # (tensor type, general.file_type: MOSTLY_Q8_0)
    "f16": (GGMLQuantizationType.F16, 1),  # MOSTLY_F16
}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6
WORD_PREFIX = "\u2581t"  # "▁t": a word "t17" after SentencePiece's space escaping
FIXED_TOKENS = 3 + 128 + 12 + 1  # specials, ASCII bytes, "▁ t 0-9", "▁t"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: its name, llama.cpp order dimensions (ne0 first), type and byte size."""

    name: str
    ne: tuple[int, ...]
    qtype: GGMLQuantizationType

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        elements = int(np.prod(self.ne))
        return elements // block * size


def tensor_specs(shape: Shape, qtype: GGMLQuantizationType) -> list[TensorSpec]:
    """The tensors of a llama model in the order llama.cpp's converter writes them."""
    f32 = GGMLQuantizationType.F32
    kv_dim = shape.n_embd // shape.n_head * shape.n_head_kv
    specs = [TensorSpec("token_embd.weight", (shape.n_embd, shape.n_vocab), qtype)]
    for i in range(shape.n_layers):
        specs += [
            TensorSpec(f"blk.{i}.attn_norm.weight", (shape.n_embd,), f32),
            TensorSpec(f"blk.{i}.attn_q.weight", (shape.n_embd, shape.n_embd), qtype),
            TensorSpec(f"blk.{i}.attn_k.weight", (shape.n_embd, kv_dim), qtype),
            TensorSpec(f"blk.{i}.attn_v.weight", (shape.n_embd, kv_dim), qtype),
            TensorSpec(f"blk.{i}.attn_output.weight", (shape.n_embd, shape.n_embd), qtype),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (shape.n_embd,), f32),
            TensorSpec(f"blk.{i}.ffn_gate.weight", (shape.n_embd, shape.n_ff), qtype),
            TensorSpec(f"blk.{i}.ffn_up.weight", (shape.n_embd, shape.n_ff), qtype),
            TensorSpec(f"blk.{i}.ffn_down.weight", (shape.n_ff, shape.n_embd), qtype),
        ]
    specs += [
        TensorSpec("output_norm.weight", (shape.n_embd,), f32),
        TensorSpec("output.weight", (shape.n_embd, shape.n_vocab), qtype),
    ]
    return specs


def vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the benchmark vocabulary (see the module docstring)."""
    if n_vocab <= FIXED_TOKENS:
        raise ValueError(f"n_vocab must exceed {FIXED_TOKENS}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(128)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 128
    tokens += ["\u2581", "t"] + [str(d) for d in range(10)] + [WORD_PREFIX]
    tokens += [f"{WORD_PREFIX}{i}" for i in range(n_vocab - FIXED_TOKENS)]
    types += [TOKEN_NORMAL] * (n_vocab - len(types))
    scores = [0.0] * n_vocab
    return tokens, scores, types


def word_count(n_vocab: int) -> int:
    """How many distinct one-token words (`t0` … `tN`) the vocabulary has."""
    return n_vocab - FIXED_TOKENS


def _pool(qtype: GGMLQuantizationType, n_in: int, rng: np.random.Generator) -> bytes:
    """Random blocks whose dequantised values have a standard deviation near 1/sqrt(n_in)."""
    if qtype == GGMLQuantizationType.Q8_0:
        block = np.dtype([("d", "<f2"), ("q", "i1", (32,))])
        blocks = np.empty(POOL_BLOCKS, dtype=block)
        # Codes uniform in [-127, 127] have a standard deviation of about 73.
        blocks["d"] = np.float16(1.0 / (73.0 * np.sqrt(n_in)))
        blocks["q"] = rng.integers(-127, 128, size=(POOL_BLOCKS, 32), dtype=np.int8)
        return blocks.tobytes()
    if qtype == GGMLQuantizationType.F16:
        values = rng.standard_normal(POOL_BLOCKS * 16, dtype=np.float32) / np.sqrt(n_in)
        return values.astype("<f2").tobytes()
    raise ValueError(f"no random pool for {qtype.name}")


def _write_repeating(out: BinaryIO, pool: memoryview, n_bytes: int, start: int = 0) -> None:
    """Write `n_bytes` taken from `pool` again and again, beginning at byte `start` of it (a block boundary)."""
    left = n_bytes
    position = start % len(pool)
    while left:
        chunk = min(left, len(pool) - position)
        out.write(pool[position:position + chunk])
        left -= chunk
        position = 0


def _pad(out: BinaryIO, written: int) -> None:
    out.write(b"\0" * (-written % ALIGNMENT))


def write_model(path: Path, shape: Shape, type_name: str, seed: int = 1) -> dict[str, Any]:
    """Write the GGUF at `path`; return a summary (bytes per part) that is also saved as PATH.json."""
    qtype, file_type = TYPES[type_name]
    specs = tensor_specs(shape, qtype)
    head_dim = shape.n_embd // shape.n_head
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"{shape.name}-{type_name}-random")
    writer.add_file_type(file_type)
    writer.add_context_length(8192)
    writer.add_block_count(shape.n_layers)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.n_vocab)
    tokens, scores, types = vocabulary(shape.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for spec in specs:
        # gguf-py takes numpy (reversed) order; the file stores ne0 first.
        writer.add_tensor_info(spec.name, tuple(reversed(spec.ne)), np.dtype(np.float32), spec.n_bytes,
                               raw_dtype=spec.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()

    rng = np.random.default_rng(seed)
    pools = {n_in: memoryview(_pool(qtype, n_in, rng)) for n_in in {shape.n_embd, shape.n_ff}}
    ones = memoryview(np.ones(shape.n_embd, dtype="<f4").tobytes())
    with path.open("ab") as out:
        _pad(out, out.tell())
        for index, spec in enumerate(specs):
            if spec.qtype == GGMLQuantizationType.F32:
                out.write(ones[: spec.n_bytes])
            else:
                pool = pools[spec.ne[0]]
                block_bytes = len(pool) // POOL_BLOCKS
                _write_repeating(out, pool, spec.n_bytes, index * START_STRIDE % POOL_BLOCKS * block_bytes)
            _pad(out, spec.n_bytes)

    embd = sum(s.n_bytes for s in specs if s.name == "token_embd.weight")
    output = sum(s.n_bytes for s in specs if s.name in ("output.weight", "output_norm.weight"))
    layers = sum(s.n_bytes for s in specs if s.name.startswith("blk."))
    summary: dict[str, Any] = {  # a JSON document
        "path": str(path),
        "shape": asdict(shape),
        "type": type_name,
        "file_bytes": path.stat().st_size,
        "tensor_bytes": embd + output + layers,
        "token_embd_bytes": embd,
        "layer_bytes": layers,
        "output_bytes": output,
        # Decoding one token reads every layer and the output matrix once; of the token
        # embeddings only one row (a get_rows on the host), which is negligible.
        "bytes_read_per_token": layers + output,
        "kv_bytes_per_token_of_context": 2 * shape.n_layers * head_dim * shape.n_head_kv * 2,  # f16 K and V
        "words": word_count(shape.n_vocab),
    }
    Path(f"{path}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--type", choices=sorted(TYPES), default="q8_0")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="rewrite an existing file")
    args = parser.parse_args(argv)
    if args.out.exists() and Path(f"{args.out}.json").exists() and not args.force:
        print(f"{args.out} exists; keeping it (--force rewrites)")
        return 0
    started = time.monotonic()
    summary = write_model(args.out, SHAPES[args.shape], args.type, args.seed)
    print(f"wrote {args.out}: {summary['file_bytes'] / 1e9:.2f} GB in {time.monotonic() - started:.1f} s; "
          f"{summary['bytes_read_per_token'] / 1e9:.3f} GB read per decoded token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
