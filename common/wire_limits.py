"""Bounds that the agent enforces and the controller must stay within: one definition for both."""

from __future__ import annotations

# Each rpc-server is a process (and, on a GPU, a CUDA context): a bound a controller cannot exceed.
MAX_RPC_SERVERS = 16
# Byte ranges in one StageTensors call; the controller sends more in several calls.
MAX_RANGES = 4096
