"""The `llama-server` command line for one placed model: the plan, spelled as llama.cpp flags."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Variables llama-server reads as defaults for its flags; inherited ones would quietly change
# what our flags say, so a coordinator never sees them.
_LLAMA_ARG_ENV = re.compile(r"^LLAMA_ARG_|^LLAMA_RPC_TENSOR_HASHES$")
# Read by a llama-server built with patches/llama.cpp/0002 (a stock one ignores it).
TENSOR_HASHES_ENV = "LLAMA_RPC_TENSOR_HASHES"
# A generative model's embeddings: its last token's state (what causal embedding models use, and
# unlike mean pooling it lets llama-server split a long input, so any input up to a slot's context fits).
GENERATIVE_POOLING = "last"


@dataclass(frozen=True)
class Backend:
    """One rpc-server a coordinator uses, and which incarnation of it holds our tensors."""

    node: str  # the agent's address
    endpoint: str  # the rpc-server's HOST:PORT
    generation: int  # the agent's rpc-server generation when the coordinator started


@dataclass(frozen=True)
class CoordinatorSpec:
    """Everything that decides what a coordinator process is; equal specs mean the same process."""

    model: str
    model_path: Path
    backends: tuple[Backend, ...]
    tensor_split: tuple[int, ...]  # per RPC device, in `--rpc` order
    n_layers: int
    ctx_per_slot: int
    parallel: int
    # llama-server's host-RAM prompt cache, MiB (0: off, -1: no limit). Off by default: when a
    # request starts it saves every idle slot's KV there, which over RPC reads that KV back
    # from the rpc-servers across the network.
    prompt_cache_mib: int = 0
    # Pre-computed FNV-1a of the model's tensors (controller/tensor_hashes.py), for a llama-server
    # with the patch that reads them; None: it hashes every weight itself, as stock does.
    tensor_hashes: Path | None = None
    # llama.cpp's built-in chat template for a GGUF that has none (controller/chat_template.py);
    # None: the GGUF's own template, or llama-server's ChatML fallback.
    builtin_chat_template: str | None = None
    # `--pooling` for a model whose GGUF names none (a generative one): its embeddings are then its
    # last token's state. "" leaves an embedding model's own pooling alone.
    embedding_pooling: str = ""

    @property
    def endpoints(self) -> list[str]:
        return [b.endpoint for b in self.backends]


def coordinator_argv(llama_server: Path, spec: CoordinatorSpec, port: int) -> list[str]:
    """The full argv. Every device is an RPC device: the controller host computes nothing itself."""
    devices = ",".join(f"RPC{i}" for i in range(len(spec.tensor_split)))
    # With jinja (llama-server's default) a template name would be read as the template's own
    # text; the named built-ins are applied by the non-jinja formatter.
    template = ["--no-jinja", "--chat-template", spec.builtin_chat_template] if spec.builtin_chat_template else []
    return [
        str(llama_server),
        "--model", str(spec.model_path),
        "--alias", spec.model,
        "--rpc", ",".join(spec.endpoints),
        "--device", devices,
        "--tensor-split", ",".join(str(n) for n in spec.tensor_split),
        # Every repeating layer and the output layer go to the devices; none stay on the host.
        "--n-gpu-layers", str(spec.n_layers + 1),
        # llama-server's -c is the total over all slots.
        "--ctx-size", str(spec.ctx_per_slot * spec.parallel),
        "--parallel", str(spec.parallel),
        # Our plan is the placement: llama.cpp must not shrink or move it to fit.
        "--fit", "off",
        # Loopback only: the gateway is the one door, and llama-server has no auth of ours.
        "--host", "127.0.0.1",
        "--port", str(port),
        "--no-webui",
        *template,
        # Embeddings from the same coordinator as completions: llama-server turns them on per batch
        # and never batches the two kinds together (same tokens at temperature 0, a few MiB more;
        # a second coordinator would need its own rpc-servers and a second copy of the weights).
        "--embeddings",
        *(("--pooling", spec.embedding_pooling) if spec.embedding_pooling else ()),
    ]


def coordinator_env(spec: CoordinatorSpec, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    clean = {k: v for k, v in env.items() if not _LLAMA_ARG_ENV.match(k)}
    # As a variable, not a flag: a llama.cpp from before --cache-ram ignores it instead of
    # refusing to start.
    clean["LLAMA_ARG_CACHE_RAM"] = str(spec.prompt_cache_mib)
    if spec.tensor_hashes is not None:
        clean[TENSOR_HASHES_ENV] = str(spec.tensor_hashes)
    return clean
