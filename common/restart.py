"""How every supervised process in llamafleet is restarted: capped exponential backoff.

Shared by the agent's rpc-server supervisor and the controller's coordinators, so that both
back off, give up and forgive in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    initial_s: float = 0.5
    max_s: float = 30.0
    # After this many failures in a row the process is `failed` and waits for an operator.
    max_failures: int = 5
    # Running healthy this long forgives earlier failures.
    healthy_reset_s: float = 30.0
    # Ready must come within this; CUDA init of many GPUs, or a model load over RPC, takes time.
    start_timeout_s: float = 120.0

    def delay(self, failures: int) -> float:
        return min(self.initial_s * 2 ** max(failures - 1, 0), self.max_s)
