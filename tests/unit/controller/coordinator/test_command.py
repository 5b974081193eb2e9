"""The llama-server command line a plan becomes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from llamafleet.controller.coordinator.command import Backend, CoordinatorSpec, coordinator_argv, coordinator_env

SPEC = CoordinatorSpec(
    model="llama3:70b", model_path=Path("/models/llama.gguf"),
    backends=(Backend("10.0.0.2:50051", "10.0.0.2:50052", 3), Backend("10.0.0.3:50051", "10.0.0.3:50052", 1)),
    tensor_split=(40, 41), n_layers=80, ctx_per_slot=8192, parallel=2,
)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_argv_spells_the_plan_and_keeps_llama_server_on_loopback() -> None:
    argv = coordinator_argv(Path("/opt/llama/bin/llama-server"), SPEC, 41234)
    assert argv[0] == "/opt/llama/bin/llama-server"
    assert flag(argv, "--rpc") == "10.0.0.2:50052,10.0.0.3:50052"
    assert flag(argv, "--device") == "RPC0,RPC1"  # the controller host's own devices take no layers
    assert flag(argv, "--tensor-split") == "40,41"
    assert flag(argv, "--n-gpu-layers") == "81"  # every layer and the output
    assert flag(argv, "--ctx-size") == str(8192 * 2) and flag(argv, "--parallel") == "2"
    assert flag(argv, "--fit") == "off"
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == "41234"
    assert flag(argv, "--alias") == "llama3:70b"


def test_embeddings_are_served_beside_completions_with_a_pooling_only_where_the_model_has_none() -> None:
    plain = coordinator_argv(Path("/bin/llama-server"), SPEC, 1)
    assert "--embeddings" in plain and "--pooling" not in plain  # an embedding model's own pooling stays
    generative = coordinator_argv(Path("/bin/llama-server"), replace(SPEC, embedding_pooling="last"), 1)
    assert "--embeddings" in generative and flag(generative, "--pooling") == "last"


def test_inherited_llama_arg_variables_cannot_change_the_flags() -> None:
    env = coordinator_env(SPEC, {"PATH": "/usr/bin", "LLAMA_ARG_HOST": "0.0.0.0", "LLAMA_ARG_N_PARALLEL": "8",
                                 "LLAMA_ARG_CACHE_RAM": "8192", "LLAMA_CACHE": "/c"})
    # Only ours: the prompt cache is off unless the operator asked (over RPC it copies KV back).
    assert env == {"PATH": "/usr/bin", "LLAMA_CACHE": "/c", "LLAMA_ARG_CACHE_RAM": "0"}


def test_a_builtin_chat_template_is_named_without_jinja_and_a_gguf_template_keeps_jinja() -> None:
    argv = coordinator_argv(Path("/opt/llama/bin/llama-server"), replace(SPEC, builtin_chat_template="gemma"), 1)
    # With jinja on, llama-server would render the word "gemma" as the whole prompt.
    assert flag(argv, "--chat-template") == "gemma" and argv.index("--no-jinja") < argv.index("--chat-template")
    plain = coordinator_argv(Path("/opt/llama/bin/llama-server"), SPEC, 1)
    assert "--chat-template" not in plain and "--no-jinja" not in plain
