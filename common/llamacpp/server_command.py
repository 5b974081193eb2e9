"""The `llama-server` command line of a coordinator, wherever it runs (the controller's host or a
worker's agent): one model, the devices that compute it in layer order, one port on loopback.

Shared so that both sides spell a plan the same way. The caller decides the devices: every one an
RPC device on the controller's host; on a worker, its own GPUs (or its CPU for the leading layers)
and RPC devices for the rest.
"""

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
# What llama.cpp's RPC client (ggml-rpc.cpp) prints before it aborts the process when an
# rpc-server died or its connection broke: the coordinator did not fail, a backend did.
RPC_BACKEND_LOST = "Remote RPC server crashed"


@dataclass(frozen=True)
class ServerCommand:
    """Everything on a coordinator's command line but the binary."""

    model_path: Path
    alias: str
    rpc_endpoints: tuple[str, ...]
    # llama.cpp device names in layer order ("CUDA0", "RPC0", …) and the layers each computes, the
    # output layer counted on the last. Layers before the first device's (`cpu_layers`) stay on
    # the host's CPU: llama.cpp offloads the last `--n-gpu-layers`.
    devices: tuple[str, ...]
    tensor_split: tuple[int, ...]
    n_layers: int
    cpu_layers: int
    ctx_per_slot: int
    parallel: int
    port: int
    # llama.cpp's built-in chat template for a GGUF that has none; "" keeps the GGUF's own.
    chat_template: str = ""
    # `--pooling` for embeddings; "" leaves an embedding model's own pooling alone.
    pooling: str = ""
    # A file holding the key every request but /health must carry (None: no key).
    api_key_file: Path | None = None

    def argv(self, llama_server: Path) -> list[str]:
        # With jinja (llama-server's default) a template name would be read as the template's own
        # text; the named built-ins are applied by the non-jinja formatter.
        template = ["--no-jinja", "--chat-template", self.chat_template] if self.chat_template else []
        rpc = ["--rpc", ",".join(self.rpc_endpoints)] if self.rpc_endpoints else []
        key = ["--api-key-file", str(self.api_key_file)] if self.api_key_file is not None else []
        if self.devices:
            placement = ["--device", ",".join(self.devices),
                         "--tensor-split", ",".join(str(n) for n in self.tensor_split),
                         # The repeating layers past `cpu_layers` and the output layer go to the devices.
                         "--n-gpu-layers", str(self.n_layers + 1 - self.cpu_layers)]
        else:
            placement = ["--device", "none", "--n-gpu-layers", "0"]  # the whole model on this host's CPU
        return [
            str(llama_server),
            "--model", str(self.model_path),
            "--alias", self.alias,
            *rpc,
            *placement,
            # llama-server's -c is the total over all slots.
            "--ctx-size", str(self.ctx_per_slot * self.parallel),
            "--parallel", str(self.parallel),
            # Our plan is the placement: llama.cpp must not shrink or move it to fit.
            "--fit", "off",
            # Loopback only: the gateway (or the agent's keyed proxy) is the one door.
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--no-webui",
            *template,
            *key,
            # Embeddings from the same coordinator as completions: llama-server turns them on per batch
            # and never batches the two kinds together (same tokens at temperature 0, a few MiB more;
            # a second coordinator would need its own rpc-servers and a second copy of the weights).
            "--embeddings",
            *(("--pooling", self.pooling) if self.pooling else ()),
        ]


def server_env(prompt_cache_mib: int, tensor_hashes: Path | None = None,
               environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    clean = {k: v for k, v in env.items() if not _LLAMA_ARG_ENV.match(k)}
    # As a variable, not a flag: a llama.cpp from before --cache-ram ignores it instead of
    # refusing to start.
    clean["LLAMA_ARG_CACHE_RAM"] = str(prompt_cache_mib)
    if tensor_hashes is not None:
        clean[TENSOR_HASHES_ENV] = str(tensor_hashes)
    return clean
