"""What an agent accepts in StartCoordinator, and the llama-server command it makes of it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from llamafleet.agent.coordinators import CoordinatorRequest, check_request, server_command
from llamafleet.common.errors import UsageError
from llamafleet.common.node_auth import coordinator_key

GPUS = ["GPU-aaaa", "GPU-bbbb"]
CPU_SHARE = CoordinatorRequest(
    id="0123456789abcdef0123456789abcdef", model="gemma3-270m:latest", model_sha256="a" * 64,
    local_gpus=(), local_layers=(10,), rpc_endpoints=("127.0.0.3:50052", "127.0.0.4:50052"),
    rpc_layers=(4, 5), n_layers=18, ctx_per_slot=2048, parallel=2, chat_template="gemma", pooling="last")


def test_a_cpu_share_stays_on_the_host_and_the_rest_goes_to_the_rpc_devices() -> None:
    check_request(CPU_SHARE, GPUS)
    argv = server_command(CPU_SHARE, Path("/models/gemma.gguf"), 41000, Path("/state/k.key")).argv(Path("/bin/llama-server"))
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[argv.index("--device") + 1] == "RPC0,RPC1"
    assert argv[argv.index("--tensor-split") + 1] == "4,5"
    # llama.cpp offloads the last --n-gpu-layers (the output layer counted): the first 10 stay here.
    assert argv[argv.index("--n-gpu-layers") + 1] == str(18 + 1 - 10)
    assert argv[argv.index("--rpc") + 1] == "127.0.0.3:50052,127.0.0.4:50052"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and flags["--port"] == "41000"
    assert argv[argv.index("--api-key-file") + 1] == "/state/k.key"
    assert argv[argv.index("--chat-template") + 1] == "gemma" and "--no-jinja" in argv


def test_a_gpu_share_names_the_gpus_first_and_a_whole_model_needs_no_rpc() -> None:
    gpu = replace(CPU_SHARE, local_gpus=("GPU-bbbb",), local_layers=(10,))
    check_request(gpu, GPUS)
    argv = server_command(gpu, Path("/m.gguf"), 1, Path("/k")).argv(Path("llama-server"))
    assert argv[argv.index("--device") + 1] == "CUDA0,RPC0,RPC1"
    assert argv[argv.index("--tensor-split") + 1] == "10,4,5"
    assert argv[argv.index("--n-gpu-layers") + 1] == "19"
    # Last, the GPU holds the output layer: the logits stay on this node.
    last = replace(gpu, local_layers=(6,), rpc_layers=(4, 9), local_last=True)
    check_request(last, GPUS)
    argv = server_command(last, Path("/m.gguf"), 1, Path("/k")).argv(Path("llama-server"))
    assert argv[argv.index("--device") + 1] == "RPC0,RPC1,CUDA0"
    assert argv[argv.index("--tensor-split") + 1] == "4,9,6"
    assert argv[argv.index("--rpc") + 1] == "127.0.0.3:50052,127.0.0.4:50052"
    alone = replace(CPU_SHARE, local_layers=(19,), rpc_endpoints=(), rpc_layers=())
    check_request(alone, GPUS)
    argv = server_command(alone, Path("/m.gguf"), 1, Path("/k")).argv(Path("llama-server"))
    assert "--rpc" not in argv and argv[argv.index("--device") + 1] == "none"
    assert argv[argv.index("--n-gpu-layers") + 1] == "0"


@pytest.mark.parametrize(("change", "message"), [
    ({"id": "../../etc"}, "id must be 32 lowercase hex digits"),
    ({"model_sha256": "A" * 64}, "model_sha256 must be 64"),
    ({"rpc_endpoints": ("127.0.0.3:50052,10.0.0.9:1", "x:2")}, "is not HOST:PORT"),
    ({"rpc_endpoints": ("127.0.0.3:70000", "x:2")}, "is not HOST:PORT"),
    ({"rpc_layers": (9,)}, "one count per rpc endpoint"),
    ({"local_gpus": ("GPU-zzzz",)}, "no GPU GPU-zzzz"),
    ({"local_layers": (5, 5)}, "one count per local GPU"),
    ({"local_layers": (11,)}, r"add up to n_layers \+ 1"),
    ({"parallel": 0}, "parallel must be"),
    ({"chat_template": "{% for m in messages %}"}, "built-in template"),
    ({"pooling": "--evil"}, "pooling must be one of"),
    ({"model": "gemma --rpc 1.2.3.4:5"}, "model must be a model name"),
    ({"local_last": True}, "local_last needs local_gpus"),
    ({"tensor_hashes": ((4096, 0, 0xCBF29CE484222325),)}, "tensor_hashes: every tensor needs a size above 0"),
    ({"local_gpus": ("GPU-aaaa",), "local_layers": (0,), "rpc_layers": (9, 10), "local_last": True},
     "last local GPU must hold the output layer"),
])
def test_what_cannot_be_run_is_refused_naming_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_request(replace(CPU_SHARE, **change), GPUS)  # type: ignore[arg-type]


def test_the_key_is_per_node_and_per_coordinator() -> None:
    one = coordinator_key("secret-of-node-a", CPU_SHARE.id)
    assert one == coordinator_key("secret-of-node-a", CPU_SHARE.id)
    assert one != coordinator_key("secret-of-node-b", CPU_SHARE.id)
    assert one != coordinator_key("secret-of-node-a", "f" * 32)
    assert "secret-of-node-a" not in one
