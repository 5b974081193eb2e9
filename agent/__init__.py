"""The worker agent (`llamafleet-agent`)."""

import os

# The agent forks only to exec llama.cpp binaries at once; gRPC's fork handlers are not needed
# and log a warning on every spawn while other threads are in gRPC. Read when grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
