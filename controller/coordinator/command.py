"""The `llama-server` command line for one placed model: the plan, spelled as llama.cpp flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamafleet.common.llamacpp.server_command import TENSOR_HASHES_ENV, ServerCommand, server_env

__all__ = ["TENSOR_HASHES_ENV", "Backend", "CoordinatorSpec", "LocalShare", "coordinator_argv", "coordinator_env"]
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
class LocalShare:
    """The share a coordinator on a worker computes with that worker's own devices (the layers
    before `backends`' in layer order, or after them when `last`): no rpc-server, no network hop
    for them."""

    node: str  # the agent that runs the coordinator
    gpus: tuple[str, ...]  # NVML UUIDs in layer order; empty: the node's CPU
    layers: tuple[int, ...]  # per GPU (one count for the CPU)
    model_sha256: str  # the node's copy of the model file
    last: bool = False  # GPUs after the rpc-servers, with the output layer (placement/plan.py)


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
    # Set when the coordinator runs on a worker (see controller/placement/coordinator.py): its
    # share there, computed locally; `backends` and `tensor_split` are then the other shares.
    local: LocalShare | None = None

    @property
    def host(self) -> str:
        """Where the coordinator runs: a node's address, or "controller"."""
        return self.local.node if self.local is not None else "controller"

    @property
    def endpoints(self) -> list[str]:
        return [b.endpoint for b in self.backends]


def coordinator_argv(llama_server: Path, spec: CoordinatorSpec, port: int) -> list[str]:
    """The full argv on the controller's host. Every device is an RPC device: this host computes
    nothing itself."""
    return ServerCommand(
        model_path=spec.model_path, alias=spec.model, rpc_endpoints=tuple(spec.endpoints),
        devices=tuple(f"RPC{i}" for i in range(len(spec.tensor_split))), tensor_split=spec.tensor_split,
        n_layers=spec.n_layers, cpu_layers=0, ctx_per_slot=spec.ctx_per_slot, parallel=spec.parallel,
        port=port, chat_template=spec.builtin_chat_template or "", pooling=spec.embedding_pooling,
    ).argv(llama_server)


def coordinator_env(spec: CoordinatorSpec, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    return server_env(spec.prompt_cache_mib, spec.tensor_hashes, environ)
