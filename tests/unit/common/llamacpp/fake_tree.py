"""A tiny CMake project shaped like llama.cpp, for unit tests of the build pipeline.

It has the two targets the build step looks for and binaries that behave like the real ones
at the level the pipeline checks (a version line; a banner, then waiting for SIGTERM).
The real build is tested in tests/integration/test_llamacpp_build.py.
"""

from __future__ import annotations

from pathlib import Path

RPC_OK = r"""
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *port = "50052";
    for (int i = 1; i + 1 < argc; i++) {
        if (argv[i][1] == 'H') host = argv[i + 1];
        if (argv[i][1] == 'p') port = argv[i + 1];
    }
    printf("Starting RPC server v7.0.0\n  endpoint       : %s:%s\n  local cache    : n/a\n", host, port);
    printf("Devices:\n  CPU: Fake CPU (1024 MiB, 512 MiB free)\n  transport      : TCP\n");
    fflush(stdout);
    for (;;) pause();
}
"""

RPC_EXITS = r"""
#include <stdio.h>
int main(void) { fprintf(stderr, "No devices found\n"); return 1; }
"""

SERVER = r"""
#include <stdio.h>
int main(void) { fprintf(stderr, "version: 42 (fake)\nbuilt with cc\n"); return 0; }
"""

BROKEN = "int main(void) { this is not C; }\n"


def make_fake_tree(root: Path, *, rpc_name: str = "ggml-rpc-server", rpc_source: str = RPC_OK,
                   server_source: str = SERVER, cmake_extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ggml").mkdir(exist_ok=True)
    (root / "ggml" / "README").write_text("stands in for the ggml sources\n")
    (root / "rpc.c").write_text(rpc_source)
    (root / "server.c").write_text(server_source)
    (root / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\n"
        "project(fake_llama_cpp C)\n"
        "set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)\n"
        f"add_executable({rpc_name} rpc.c)\n"
        "add_executable(llama-server server.c)\n"
        + cmake_extra
    )
    return root
